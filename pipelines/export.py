"""Export a trained student as one local folder for timm, open_clip, clip_benchmark and MLflow.

    python pipelines/export.py model=runs/uta-local output=exports/uta-local
    python pipelines/export.py model=s3://bucket/runs/uta-l14 output=exports/uta-l14 s3.endpoint_url=...
    python pipelines/export.py model=UTA-L.pt output=exports/uta-l   # a released UTA: its own text tower
    python pipelines/export.py model=UTA-B.pt teacher.arch=EVA02-B-16 output=exports/uta-b   # another one
    python pipelines/export.py model=exports/uta-local     # after moving the folder: relink it
    python pipelines/export.py model=runs/uta-local output=exports/x tracking.register_as=uta-student

Then ``timm.create_model("local-dir:<output>", pretrained=True)`` is the student's trunk and
``open_clip.create_model_and_transforms("local-dir:<output>")`` the student + the teacher's text
tower (a released UTA checkpoint: its own) as a CLIP (``clip_benchmark eval --model local-dir:<output> ...``). With
``tracking.enabled=true`` (or ``tracking.register_as``) it is also logged as an MLflow model.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.lib.cli import job_parser, print_result, run_job, setup_logging
from pipelines.lib.export.job import ExportConfig, run


def main(argv: list[str] | None = None) -> int:
    args = job_parser(__doc__, None, None, "model=runs/x output=exports/x", ExportConfig).parse_intermixed_args(argv)
    setup_logging()
    overrides = list(args.overrides)
    if any(o.startswith("tracking.register_as=") for o in overrides):
        overrides.append("tracking.enabled=true")
    return run_job(ExportConfig, args, overrides, run, print_result)


if __name__ == "__main__":
    sys.exit(main())
