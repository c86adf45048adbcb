"""What owning an output costs: one fence check (done before every write a job makes into its output), on a
local disk and on an S3 API server (moto's, on loopback), as a table.

A check lists the output's ``_lease/`` folder and reads its newest record: two requests on S3, whatever the
size of the dataset. Needs the dev dependencies (moto).
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time


def check_times(uri: str, s3, checks: int) -> list[float]:
    from uta_core.lease import Lease, LeaseConfig

    lease = Lease(uri, s3, "output.path", LeaseConfig())
    lease.acquire()
    try:
        fence, times = lease.fence, []
        for _ in range(checks):
            start = time.perf_counter()
            fence.check("a benchmark write")
            times.append(time.perf_counter() - start)
        return times
    finally:
        lease.release()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checks", type=int, default=200, help="fence checks per store (default: %(default)s)")
    args = parser.parse_args(argv)
    for key, value in (("AWS_ACCESS_KEY_ID", "bench"), ("AWS_SECRET_ACCESS_KEY", "bench"),
                       ("AWS_DEFAULT_REGION", "us-east-1")):
        os.environ.setdefault(key, value)
    import boto3
    from moto.server import ThreadedMotoServer

    from uta_core.data.storage import S3Options

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # the server's request lines
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="fence-bench")
    try:
        rows = [("local disk", check_times(tempfile.mkdtemp(prefix="uta-fence-") + "/out", None, args.checks)),
                ("S3 (moto, loopback)", check_times("s3://fence-bench/out", S3Options(endpoint_url=endpoint),
                                                    args.checks))]
    finally:
        server.stop()
    print(f"{'store':<22}{'median ms':>10}{'p95 ms':>10}{'max ms':>10}")
    for name, times in rows:
        ms = sorted(t * 1e3 for t in times)
        print(f"{name:<22}{statistics.median(ms):>10.3f}{ms[int(0.95 * (len(ms) - 1))]:>10.3f}{ms[-1]:>10.3f}")
    print(f"{args.checks} checks per store; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
