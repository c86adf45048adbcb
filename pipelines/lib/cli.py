"""The command line every job shares: ``[--config YAML] [--smoke-test] [key=value ...]``, logging,
exit codes (0 done, 1 failed, 2 a user error: one line, no traceback)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray.train

from uta_core import tracking
from uta_core.config import describe_config, load_config, printable_config
from uta_core.data.storage import StorageError, storage_failure
from uta_core.errors import DiskFull, RunCannotContinue, cannot_continue, is_disk_full
from uta_core.secrets import redact_urls


def job_parser(doc: str, default_config: Path | None, smoke_help: str | None, example: str,
               config_cls: type, commands: tuple[str, ...] = ()) -> argparse.ArgumentParser:
    """The command line every job shares: ``[--config YAML] [--smoke-test] [--print-config] [key=value ...]``;
    ``--help`` lists every config key with its type, default and what it does."""
    parser = argparse.ArgumentParser(description=doc.strip().split("\n\n", 1)[0], epilog=config_help(config_cls),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=default_config,
                        help="YAML config (default: %(default)s)" if default_config else "optional YAML config")
    if smoke_help:
        parser.add_argument("--smoke-test", action="store_true", help=smoke_help)
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (the YAML file + the overrides) and exit")
    if commands:
        parser.add_argument("command", choices=commands)
    parser.add_argument("overrides", nargs="*", help=f"dotted key=value overrides, e.g. {example}")
    return parser


def config_help(config_cls: type) -> str:
    keys = "\n".join(f"  {line}" for line in describe_config(config_cls))
    return ("config keys (defaults before the YAML file; set any with key=value, values are YAML; "
            f"the YAML file's values: --print-config):\n{keys}")


def load_job_config(config_cls: type, args: argparse.Namespace, overrides: list[str]) -> Any:
    """The job's config from ``--config`` + overrides; with ``--print-config`` it is printed as YAML and
    None is returned (the command then exits 0)."""
    if getattr(args, "print_config", False):
        print(printable_config(config_cls, args.config, overrides), end="")
        return None
    return load_config(config_cls, args.config, overrides)


class _Format(logging.Formatter):
    """``12:00:01 uta.cache: message``; the level only when it is not INFO."""

    def format(self, record: logging.LogRecord) -> str:
        level = "" if record.levelno == logging.INFO else f"{record.levelname} "
        return f"{self.formatTime(record, '%H:%M:%S')} {level}{record.name}: {record.getMessage()}" + (
            "\n" + self.formatException(record.exc_info) if record.exc_info else "")


def setup_logging() -> None:
    """Warnings from libraries, progress from our own ``uta.*`` loggers; MLflow's INFO chatter off."""
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    handler = logging.StreamHandler()
    handler.setFormatter(_Format())
    logging.basicConfig(level=logging.WARNING, handlers=[handler])
    logging.getLogger("uta").setLevel(logging.INFO)
    for name in ("mlflow", "alembic"):  # already imported: MLFLOW_LOGGING_LEVEL came too late for them
        logging.getLogger(name).setLevel(logging.WARNING)


def start_job(args: argparse.Namespace, smoke_overrides: Callable[[Path], list[str]], job: str) -> list[str]:
    """Logging, then the command's overrides; ``--smoke-test`` prepends generated inputs in a temp folder."""
    setup_logging()
    overrides = list(args.overrides)
    if getattr(args, "smoke_test", False):
        workdir = Path(tempfile.mkdtemp(prefix=f"uta-{job}-smoke-"))
        print(f"smoke test in {workdir}")
        overrides = smoke_overrides(workdir) + overrides
        uri = next((o.split("=", 1)[1] for o in reversed(overrides) if o.startswith("tracking.tracking_uri=")), None)
        if uri:  # where its runs go, and the command that opens them (printed again at the end)
            print(f"MLflow runs go to {uri}")
    return overrides


def job_main(argv: list[str] | None, name: str, doc: str, config_cls: type, default_config: Path, example: str, *,
             smoke: tuple[Callable[[Path], list[str]], str], run: Callable[[Any], Any],
             report: Callable[[Any], int | None]) -> int:
    """A job's whole command: parse ``[--config] [--smoke-test] [--print-config] key=value...``, set up the
    console, load the config, run, report. ``smoke``: (the smoke test's overrides in a temp folder, its help)."""
    smoke_overrides, smoke_help = smoke
    args = job_parser(doc, default_config, smoke_help, example, config_cls).parse_intermixed_args(argv)
    return run_job(config_cls, args, start_job(args, smoke_overrides, name), run, report)


def run_job(config_cls: type, args: argparse.Namespace, overrides: list[str], run: Callable[[Any], Any],
            report: Callable[[Any], int | None]) -> int:
    """Load the config, run the job, report its result. Exit codes: 0 done (or what ``report`` returns);
    2 a user error (config, paths, credentials, mismatched inputs: one line, no traceback); 1 training
    failed."""
    try:
        cfg = load_job_config(config_cls, args, overrides)
        if cfg is None:
            return 0
        result = run(cfg)
    except RunCannotContinue as err:  # damaged data, a NaN loss, an output in use: one line, no retry would help
        return user_error(cannot_continue(err), code=1)
    except ValueError as err:
        return user_error(err)
    except ray.train.TrainingFailedError as err:
        return user_error(cannot_continue(err) or storage_failure_in(err) or f"training failed: {err}", code=1)
    except Exception as err:  # a full disk, storage gone (S3 unreachable, refused, no bucket): one line
        if is_disk_full(err):
            return user_error(DiskFull.of(err), code=1)
        line = storage_failure_in(err)
        if line is None:
            raise
        return user_error(line, code=1)
    return report(result) or 0


def storage_failure_in(err: BaseException) -> StorageError | None:
    """The storage failure behind ``err`` (its causes and contexts included), as one line."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        found = storage_failure(err)
        if found is not None:
            return found
        err = err.__cause__ or err.__context__
    return None


def print_result(result: dict) -> None:
    """A job's result as JSON on stdout; where its MLflow run is on stderr (stdout stays JSON)."""
    print(json.dumps(result, indent=1, default=str))
    if result.get("mlflow_run_id"):
        print(tracking.where_runs_are(result["tracking_uri"], result["mlflow_run_id"]), file=sys.stderr)


def user_error(message: object, code: int = 2) -> int:
    """A mistake the user can fix (config, paths, credentials): one line on stderr, no traceback,
    no password of any URL it quotes."""
    line = " ".join(redact_urls(str(message)).split())
    print(f"error: {line}", file=sys.stderr)
    return code
