"""The training loop's prefetch: host work for the next micro-batches on a thread, in order, for
exactly the micro-batches the loop will train on, each with its own (step, micro) draws."""

import itertools
import threading
from types import SimpleNamespace

import pytest
import torch

from pipelines.lib.train.loop import TrainLoop
from uta_core.data.epochs import Cursor
from uta_core.data.prefetch import pin, prefetched


def test_items_are_prepared_in_order_on_one_thread_depth_ahead():
    threads, started = set(), []

    def prepare(i):
        threads.add(threading.get_ident())
        started.append(i)
        return i * 10

    read = []
    it = prefetched((read.append(i) or i for i in range(10)), prepare, depth=3)
    assert next(it) == 0
    assert read == [0, 1, 2, 3]  # items 1..3 were handed to the thread before item 0 came back
    assert list(it) == [i * 10 for i in range(1, 10)]
    assert started == list(range(10))
    assert threads and threading.get_ident() not in threads


def test_depth_zero_prepares_each_item_when_asked_on_the_callers_thread():
    threads = []
    assert list(prefetched(range(3), lambda i: threads.append(threading.get_ident()) or i, depth=0)) == [0, 1, 2]
    assert set(threads) == {threading.get_ident()}
    with pytest.raises(ValueError, match="depth=-1"):
        list(prefetched(range(3), lambda i: i, depth=-1))


def test_an_error_in_prepare_surfaces_at_its_item_and_closing_reads_no_further():
    read = []

    def items():
        for i in itertools.count():
            read.append(i)
            yield i

    def prepare(i):
        if i == 2:
            raise RuntimeError("bad row 2")
        return i

    it = prefetched(items(), prepare, depth=2)
    assert [next(it), next(it)] == [0, 1]
    with pytest.raises(RuntimeError, match="bad row 2"):
        next(it)
    assert max(read) <= 2 + 2  # never more than depth ahead of the consumer

    it = prefetched(items(), lambda i: i, depth=2)
    next(it)
    it.close()  # waits for what is in flight, reads nothing more
    assert len(read) <= 5 + 3


def test_pin_leaves_cpu_tensors_alone():
    x = torch.arange(4)
    assert pin(x, torch.device("cpu")) is x


class _RecordingTask:
    def prepare(self, batch, step, micro):
        return {"row": batch["row"], "step": step, "micro": micro}


def _worker(step, micro_in_epoch, total_steps, accumulation, prefetch):
    return SimpleNamespace(
        pos=SimpleNamespace(step=step, micro_in_epoch=micro_in_epoch),
        plan=SimpleNamespace(total_steps=total_steps, accumulation=accumulation),
        task=_RecordingTask(), cfg=SimpleNamespace(train=SimpleNamespace(prefetch=prefetch)))


def _stream(read):
    for row in itertools.count():  # an epoch stream never ends by itself (it starts its list over)
        read.append(row)
        yield {"row": row}, Cursor(row=row + 1)


@pytest.mark.parametrize("prefetch", [0, 2])
def test_the_loop_prepares_each_micro_batch_with_its_step_and_stops_at_the_epochs_end(prefetch):
    # A resumed epoch: 3 of its 5 steps done (2 micro-batches a step), the run has 100 steps.
    read = []
    worker = _worker(step=3, micro_in_epoch=6, total_steps=100, accumulation=2, prefetch=prefetch)
    out = list(TrainLoop._prepared(worker, _stream(read), epoch_steps=5))
    assert [(b["step"], b["micro"]) for b, _ in out] == [(3, 0), (3, 1), (4, 0), (4, 1)]
    assert [b["row"] for b, _ in out] == [0, 1, 2, 3] and out[-1][1] == Cursor(row=4)
    assert read == [0, 1, 2, 3]  # nothing read past the epoch's last step (no second pass, no warning)


def test_the_loop_prepares_nothing_past_the_runs_last_step():
    read = []
    worker = _worker(step=7, micro_in_epoch=0, total_steps=8, accumulation=3, prefetch=2)
    out = list(TrainLoop._prepared(worker, _stream(read), epoch_steps=20))
    assert [(b["step"], b["micro"]) for b, _ in out] == [(7, 0), (7, 1), (7, 2)]
    assert read == [0, 1, 2]
