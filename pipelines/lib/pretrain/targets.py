"""The teacher modes of pre-training: ``data.teacher_mode`` -> its target source (``uta_core.targets``).

A new mode is a module with its ``TargetSource`` (``uta_core/targets/source.py`` says what one
does) and one line here, plus its name in ``config.TeacherMode``.
"""

from __future__ import annotations

from collections.abc import Callable

from pipelines.lib.pretrain.config import PretrainConfig
from uta_core.targets.cached import CachedTargets
from uta_core.targets.online import OnlineTargets
from uta_core.targets.source import TargetSource
from uta_core.targets.streamed import StreamCodecConfig, StreamedTargets


def online(cfg: PretrainConfig) -> OnlineTargets:
    d = cfg.data
    if d.input is None:
        raise ValueError("data.teacher_mode=online reads raw shards: set data.input.paths")
    return OnlineTargets(input=d.input, views=d.views, num_views=d.num_views, num_samples=d.num_samples,
                         teacher=cfg.teacher, teacher_random_seed=cfg.teacher_random_seed, s3=cfg.s3)


def stream(cfg: PretrainConfig) -> StreamedTargets:
    if cfg.data.input is None:
        raise ValueError("data.teacher_mode=stream reads raw shards: set data.input.paths")
    s = cfg.stream
    return StreamedTargets(online=online(cfg), codec=StreamCodecConfig(codec=s.codec, token_rank=s.token_rank,
                                                                        basis_views=s.basis_views))


def cache(cfg: PretrainConfig) -> CachedTargets:
    if not cfg.data.cache:
        raise ValueError("data.teacher_mode=cache reads a teacher cache: set data.cache to its root folder/URI")
    return CachedTargets.load(cfg.data.cache, cfg.data.cache_views, cfg.teacher_random_seed, cfg.s3)


TARGET_SOURCES: dict[str, Callable[[PretrainConfig], TargetSource]] = {
    "online": online,
    "cache": cache,
    "stream": stream,
}


def target_source(cfg: PretrainConfig) -> TargetSource:
    """The run's target source, checked against its student and evaluation (metadata only)."""
    return check_fits(TARGET_SOURCES[cfg.data.teacher_mode](cfg), cfg)


def check_fits(source: TargetSource, cfg: PretrainConfig) -> TargetSource:
    """Refuse a student or an evaluation the source cannot serve."""
    source.check(cfg.student)
    ev = cfg.eval
    if ev.enabled and ev.classifier_path is None and not (source.teacher_in_worker or source.teacher_apart):
        raise ValueError(f"eval in teacher_mode={source.mode} needs eval.classifier_path (no teacher runs in the "
                         "run): write one with `python pipelines/evaluate.py build-classifier`")
    return source
