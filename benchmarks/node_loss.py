"""Node loss on real Ray nodes of this machine: the stream's teacher node, the Ray Train worker's node and
the caching job's teacher node, each killed mid-job and replaced, and the teacher pool growing onto a node
that joins and shrinking off one that is lost, as one table of what was lost.

    ./uta bench node_loss              # the four trials (~9 min on 2 cores)
    ./uta bench node_loss -k stream    # one of them (pytest's -k)

Each trial is a test of ``tests/test_node_loss.py`` (run here with ``UTA_LONG_TESTS=1``; the stream trial
also runs in every CI): a local head (cluster/local/start.sh) and a worker node offering the job's custom
resource (add_node.sh); its actors placed there (checked from Ray's state API); that node SIGKILLed as a
lost machine is (remove_node.sh --kill) once the job is under way; a replacement node added. Columns:

- rows lost / repeated: against the same run uninterrupted and without Ray (training: every epoch's rows,
  in order; cache: every (key, view) of the inputs, and no part a committed shard does not list);
- said (s): from the kill to the job's console saying what it waits for ("-": the job does not wait on
  the node; Ray restarts its work where it finds room; pool: saying it goes on with the actors left);
- join (s): the replacement node's ``ray start`` until it is up (pool: the node it grows onto);
- back (s): from the join to the job's console saying it goes on (the pool's actors back; the trainers
  resumed from their checkpoint; the cache's next committed shard; pool: the actor that joined taken on);
- redone: training steps logged twice in MLflow (steps trained again after a restart from a checkpoint);
- trial (s): the whole trial, with its uninterrupted reference run.
The last line says ``node loss: lost 0, repeated 0 (stream, pool, train, cache)`` when every trial held.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = [("trial", "trial", 8), ("rows lost", "lost", 10), ("repeated", "repeated", 10), ("said (s)", "detect_s", 10),
           ("join (s)", "join_s", 10), ("back (s)", "refill_s", 10), ("redone", "redone", 10),
           ("trial (s)", "seconds", 10)]


def cell(value) -> str:
    if isinstance(value, float) and math.isnan(value):
        return "-"
    return f"{value:.1f}" if isinstance(value, float) else str(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-k", default=None, help="only the trials whose test names match (pytest's -k)")
    args = parser.parse_args(argv)
    report = Path(tempfile.mkdtemp(prefix="uta-node-loss-")) / "trials.jsonl"
    env = {**os.environ, "UTA_LONG_TESTS": "1", "UTA_NODE_LOSS_REPORT": str(report)}
    load_before = os.getloadavg()
    done = subprocess.run([sys.executable, "-m", "pytest", "tests/test_node_loss.py", "-q", "-p", "no:cacheprovider",
                           *(["-k", args.k] if args.k else [])], cwd=ROOT, env=env)
    rows = [json.loads(line) for line in report.read_text().splitlines()] if report.exists() else []
    print("\n" + "".join(f"{title:<{width}}" for title, _, width in COLUMNS))
    for row in rows:
        print("".join(f"{cell(row[key]):<{width}}" for _, key, width in COLUMNS))
    print(f"load average {' '.join(f'{x:.2f}' for x in load_before)} before, "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} after")
    held = done.returncode == 0 and rows and all(r["lost"] == 0 and r["repeated"] == 0 for r in rows)
    names = ", ".join(r["trial"] for r in rows) or "no trial ran"
    lost, repeated = sum(r["lost"] for r in rows), sum(r["repeated"] for r in rows)
    print(f"node loss: lost {lost}, repeated {repeated} ({names})" + ("" if held else
          f"; FAILED: pytest exit {done.returncode}, see its report above"))
    return 0 if held else 1


if __name__ == "__main__":
    sys.exit(main())
