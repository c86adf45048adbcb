"""What a job prints while it runs: our stages, one progress bar and our own warnings.

Ray's worker output (its actors' and tasks' stdout/stderr: Ray Train's and Ray Data's internal
logs, library chatter) stays in the session's log files (``ray.init(log_to_driver=False)``; the
folder is printed at start). Rank 0 of a training run sends its progress (step, last loss,
images/s) and the ``uta`` loggers' warnings to a small actor (``ProgressBoard``); the driver polls
it and draws a tqdm bar with rate and ETA, printing the warnings above it. Without a terminal
(``ray job submit`` logs, CI) the bar becomes one line every ``LINE_EVERY_S`` seconds.

Driver: ``with DriverProgress("pretrain", total_steps) as progress: fit(..., progress.name)``.
Worker: ``WorkerProgress(name)`` (a no-op when there is no board, e.g. under a Tune sweep).
"""

from __future__ import annotations

import logging
import sys
import threading
import time
import uuid
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from tqdm import tqdm

LINE_EVERY_S = 30.0  # without a terminal: one progress line this often
POLL_S = 0.5
SEND_EVERY_S = 0.5  # a worker sends at most this often (and always at log steps)


@ray.remote(num_cpus=0)
class ProgressBoard:
    """The latest progress of one run and the warnings not yet printed."""

    def __init__(self) -> None:
        self.state: dict[str, Any] = {}
        self.messages: list[str] = []

    def update(self, state: dict[str, Any]) -> None:
        self.state.update(state)

    def message(self, text: str) -> None:
        self.messages.append(text)

    def poll(self) -> tuple[dict[str, Any], list[str]]:
        messages, self.messages = self.messages, []
        return dict(self.state), messages


def format_postfix(state: dict[str, Any]) -> str:
    parts = [str(state["note"])] if "note" in state else []
    if "loss" in state:
        parts.append(f"loss {state['loss']:.4f}")
    for key, label in (("zeroshot_top1", "zero-shot"), ("temperature", "T")):
        if key in state:
            parts.append(f"{label} {state[key]:.3f}")
    if "images_per_s" in state:
        parts.append(f"{state['images_per_s']:.0f} img/s")
    return ", ".join(parts)


class DriverProgress:
    """A thread that draws one bar until the block ends, from a board actor that workers update
    (``remote=True``) or from ``set()`` calls in the driver itself (the cache job's commit loop)."""

    def __init__(self, desc: str, total: int | None, unit: str = "step", initial: int = 0,
                 remote: bool = True) -> None:
        self.desc, self.total, self.unit, self.initial = desc, total, unit, initial
        self.name = f"uta-progress-{uuid.uuid4().hex[:12]}"
        self._remote = remote
        self._local: dict[str, Any] = {}
        self._board = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._tty = sys.stderr.isatty()
        self._bar: tqdm | None = None
        self._last_line = 0.0
        self._start = time.perf_counter()
        self._seen = False

    def set(self, step: int, **state: Any) -> None:
        """The driver's own progress (``remote=False``)."""
        self._local = {"step": step, **state}

    def __enter__(self) -> DriverProgress:
        if self._remote:  # on the driver's node: a board on a node that is lost (a spot teacher node) takes
            # the console with it, while the run goes on; the driver's own node outlives the run or ends it
            here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
            self._board = ProgressBoard.options(name=self.name, scheduling_strategy=here).remote()
        if self._tty and self._remote:  # the workers' start is a stage of its own, with its own clock
            self._bar = tqdm(desc=f"{self.desc}: starting the workers", bar_format="{desc} {elapsed}",
                             file=sys.stderr)
        elif self._tty:
            self._new_bar()
        self._thread = threading.Thread(target=self._run, name="uta-progress", daemon=True)
        self._thread.start()
        return self

    def _new_bar(self) -> None:
        self._bar = tqdm(total=self.total, desc=self.desc, unit=self.unit, initial=self.initial,
                         dynamic_ncols=True, file=sys.stderr)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._draw(final=True)
        if self._bar is not None:
            self._bar.close()
        if self._board is not None:
            ray.kill(self._board)

    def _run(self) -> None:
        while not self._stop.wait(POLL_S):
            self._draw()

    def _draw(self, final: bool = False) -> None:
        if self._board is None:
            state, messages = dict(self._local), []
        else:
            try:
                state, messages = ray.get(self._board.poll.remote(), timeout=10)
            except Exception:  # Ray shutting down under us: nothing more to draw
                return
        for text in messages:
            (self._bar.write if self._bar is not None else print)(text, file=sys.stderr)
        step = int(state.get("step", self.initial))
        if self._remote and not self._seen:
            if "step" not in state:
                self._starting(final)
                return
            # The workers run: the bar starts here (at a resumed run's checkpoint), on a clock of its own.
            self._seen, waited = True, time.perf_counter() - self._start
            self.initial, self._start = step, time.perf_counter()
            if self._bar is not None:
                self._bar.close()
            print(f"{self.desc}: workers started in {waited:.0f} s", file=sys.stderr, flush=True)
            if self._tty:
                self._new_bar()
        postfix = format_postfix(state)
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            self._bar.set_postfix_str(postfix, refresh=True)
            return
        now = time.perf_counter()
        if final or now - self._last_line >= LINE_EVERY_S:
            self._last_line = now
            meter = tqdm.format_meter(step, self.total, now - self._start, prefix=self.desc, unit=self.unit,
                                      initial=self.initial)
            print(f"{meter} {postfix}".rstrip(), file=sys.stderr, flush=True)


    def _starting(self, final: bool) -> None:
        """The stage before the first step: its elapsed time (a TTY's line, or a line every ``LINE_EVERY_S``)."""
        if self._bar is not None:
            self._bar.refresh()
            return
        now = time.perf_counter()
        if final or now - self._last_line >= LINE_EVERY_S:
            self._last_line = now
            print(f"{self.desc}: starting the workers ({now - self._start:.0f} s)", file=sys.stderr, flush=True)


class _ToBoard(logging.Handler):
    """Rank 0's ``uta`` warnings, and records logged with ``extra=CONSOLE``, to the driver's console."""

    def __init__(self, board) -> None:
        super().__init__(logging.INFO)
        self.board = board
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno < logging.WARNING and not getattr(record, "console", False):
            return
        try:
            self.board.message.remote(self.format(record) if record.levelno >= logging.WARNING else
                                      f"{record.name}: {record.getMessage()}")
        except Exception:
            pass


CONSOLE = {"console": True}  # log.info(..., extra=CONSOLE): also on the driver's console, from rank 0


class WorkerProgress:
    """Rank 0's side: steps and metrics to the driver's board; the ``uta`` warnings too."""

    def __init__(self, name: str | None, active: bool) -> None:
        self.board = None
        self._sent = 0.0
        if not (name and active):
            return
        try:
            self.board = ray.get_actor(name)
        except ValueError:  # no board (a Tune trial reports to Tune instead)
            return
        uta = logging.getLogger("uta")
        for handler in [h for h in uta.handlers if isinstance(h, _ToBoard)]:  # a reused worker process
            uta.removeHandler(handler)
        uta.addHandler(_ToBoard(self.board))
        if uta.getEffectiveLevel() > logging.INFO:  # a worker process: let the CONSOLE records through
            uta.setLevel(logging.INFO)

    def step(self, step: int, metrics: dict[str, float] | None = None) -> None:
        if self.board is None:
            return
        now = time.perf_counter()
        if metrics is None and now - self._sent < SEND_EVERY_S:
            return
        self._sent = now
        self.board.update.remote({"step": step, **(metrics or {})})
