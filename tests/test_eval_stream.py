"""The streamed evaluation's plan (pipelines/lib/evaluate/stream.py), as Ray Data optimises it."""

import pytest

from pipelines.lib.evaluate.stream import Encoder, EvalSet, eval_dataset
from uta_core.data.shards import InputConfig
from uta_core.data.storage import S3Options


@pytest.mark.ray
def test_decode_tasks_stay_apart_from_the_encoder_actors(ray_local, digits_webdataset, capsys):
    """Ray Data fuses a task map into the actor map after it when their resource requests are equal.
    Fused, one actor decoded whole shards serially and returned their embeddings only at the end (the
    bar stood still). The optimised physical plan keeps them apart, for one set and for two."""
    inputs = InputConfig(paths=[str(digits_webdataset.root)])
    for sets in ([EvalSet(inputs, "label")], [EvalSet(inputs, "label"), EvalSet(inputs, "caption")]):
        ds, total = eval_dataset(sets, Encoder("never-loaded", "cpu", 1, 1, 8), s3=S3Options(), size=32,
                                 max_images=None)
        ds.explain()
        optimized = capsys.readouterr().out.split("Physical Plan (Optimized)")[1]
        assert "ActorPoolMapOperator[MapBatches(StudentEncoder)]" in optimized, optimized
        assert "->MapBatches(StudentEncoder)" not in optimized, optimized
        assert total is None  # these shards come without producer stats files
