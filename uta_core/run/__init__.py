"""A training run's folder: its layout and every read and write of it (``folder.py``, docs/RUN_FORMAT.md)."""

from uta_core.run.folder import RunFolder, checkpoint_dir_name

__all__ = ["RunFolder", "checkpoint_dir_name"]
