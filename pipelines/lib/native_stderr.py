"""Known, harmless lines that Ray's C++ core worker writes straight to the driver's stderr (file descriptor 2,
past Python's ``sys.stderr`` and ``logging``), dropped from the console.

The one dropped today: ``core_worker.cc ... has constructor arguments in the object store and max_restarts >
0`` (ray-project/ray#53727), printed as an error for every Ray Data actor pool (the cache job's teacher
actors) and Ray Train controller, though nothing is wrong: Ray Data puts every actor's constructor arguments
in the object store itself. Everything else passes through as it comes, byte for byte: a line is held back
only while it looks like a native log line (it starts with ``[``) and has no newline yet, so progress bars
(``\\r`` redraws) stay live. The dropped lines are still in Ray's own log files.
"""

from __future__ import annotations

import atexit
import os
import re
import sys
import threading

KNOWN = (re.compile(rb"core_worker\.cc:\d+: Actor with class name: .* has constructor arguments in the object store"),)


RAW_ENV = "UTA_NATIVE_STDERR"  # =raw: no filter (the test suite, or to see every native line)


def drop_known_lines(patterns: tuple[re.Pattern[bytes], ...] = KNOWN) -> None:
    """Put a filter between fd 2 and the terminal (or the job's log) for the rest of this process. Called once
    Ray runs: the processes a local Ray starts keep the real stderr, so none holds the filter's pipe open."""
    if getattr(drop_known_lines, "installed", False) or os.environ.get(RAW_ENV) == "raw":
        return
    sys.stderr.flush()
    target = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    pump = threading.Thread(target=_pump, args=(read_end, target, patterns), name="native-stderr", daemon=True)
    pump.start()
    drop_known_lines.installed = True

    def restore() -> None:  # at exit: the pipe's last write end closes, the pump writes what is left, ends
        try:
            sys.stderr.flush()
        except ValueError:
            pass
        os.dup2(target, 2)
        pump.join(timeout=2)

    atexit.register(restore)


def _pump(read_end: int, target: int, patterns: tuple[re.Pattern[bytes], ...]) -> None:
    held, line_start = b"", True
    while chunk := os.read(read_end, 65536):
        data, held, out = held + chunk, b"", []
        while data:
            end = data.find(b"\n")
            if end < 0:
                if line_start and data.startswith(b"["):
                    held = data  # maybe a native log line: wait for its end
                else:
                    out.append(data)
                    line_start = False
                break
            line, data = data[:end + 1], data[end + 1:]
            if not (line_start and any(p.search(line) for p in patterns)):
                out.append(line)
            line_start = True
        if out:
            _write_all(target, b"".join(out))
    if held:
        _write_all(target, held)
    os.close(read_end)


def _write_all(fd: int, data: bytes) -> None:
    while data:
        try:
            data = data[os.write(fd, data):]
        except OSError:  # the console is gone: nothing to tell
            return
