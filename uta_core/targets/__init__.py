"""Where a pre-training batch's teacher tokens come from: one ``TargetSource`` per run.

``source.py`` states the seam; ``online.py`` runs the frozen teacher in every training worker
(the paper's recipe), ``cached.py`` restores the tokens a teacher cache stores. The job picks
one by ``data.teacher_mode`` (``pipelines/lib/pretrain/targets.py``).
"""
