"""Errors that retrying cannot fix: the run stops with one line that names the problem and the fix.

A worker that raises one of these is not worth restarting from its checkpoint (the same damaged
part, the same diverged step would come back); the job's command prints its message, no
traceback, and exits non-zero.
"""

from __future__ import annotations

import errno


class RunCannotContinue(ValueError):
    """Base of the errors a restart would only repeat."""


class NonFiniteLoss(RunCannotContinue):
    """The loss or the gradient norm became NaN or infinite."""


class DiskFull(RunCannotContinue):
    """No space (or quota) left where the job writes."""

    @classmethod
    def of(cls, err: OSError) -> DiskFull:
        where = err.filename or "its output"
        return cls(f"no space left on the device (or quota) writing {where}: free space there or point the job's "
                   "output elsewhere, then rerun; what was committed (cache shards, checkpoints) is intact and the "
                   "rerun continues from it")


def is_disk_full(err: BaseException) -> bool:
    return isinstance(err, OSError) and (err.errno in (errno.ENOSPC, errno.EDQUOT) or
                                         "No space left on device" in str(err))


def cannot_continue(err: BaseException) -> RunCannotContinue | None:
    """The ``RunCannotContinue`` behind ``err`` (a Ray wrapping, a worker group's failures), if any; a full
    disk counts as one."""
    seen, todo = set(), [err]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, RunCannotContinue):  # Ray's wrapping subclasses the error: its ``cause`` is the plain one
            cause = getattr(e, "cause", None)
            return cause if isinstance(cause, RunCannotContinue) else e
        if is_disk_full(e):
            return DiskFull.of(e)
        todo += [e.__cause__, e.__context__, getattr(e, "cause", None), getattr(e, "controller_failure", None)]
        for name in ("worker_failures", "errors"):
            found = getattr(e, name, None)
            if isinstance(found, dict):
                todo += [v for v in found.values() if isinstance(v, BaseException)]
            elif isinstance(found, (list, tuple)):
                todo += [v for v in found if isinstance(v, BaseException)]
    return None
