"""What ``./uta`` runs: its commands, the pipelines and the benchmarks, each with its one-line purpose
(the first sentence of its docstring, read without importing it).

    python scripts/usage.py          the whole usage (``./uta``, ``./uta help``)
    python scripts/usage.py bench    the benchmarks only (``./uta bench``)
"""

from __future__ import annotations

import ast
import re
import shutil
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = [
    ("demo [key=value ...]", "the end-to-end job on this machine: local Ray, local files, SQLite MLflow (~2 min)"),
    ("test [pytest args]", "the test suite"),
    ("bench NAME [args]", "a benchmark (below); ./uta bench NAME --help for its options"),
    ("python ARGS...", "python in the project's environment, e.g. ./uta python pipelines/pretrain.py --help"),
    ("help", "this list"),
]


def purpose(script: Path) -> str:
    """The first sentence of a script's docstring, on one line."""
    doc = ast.get_docstring(ast.parse(script.read_text())) or ""
    text = " ".join(doc.split("\n\n")[0].split())
    end = re.search(r"(?<!Fig)(?<!Tab)(?<!e\.g)\.\s+(?=[A-Z])", text)
    return text[: end.start() + 1] if end else text


def table(rows: list[tuple[str, str]], indent: str = "  ") -> str:
    width = max(len(name) for name, _ in rows)
    columns = max(60, min(120, shutil.get_terminal_size().columns))
    return "\n".join(textwrap.fill(text, columns, initial_indent=f"{indent}{name:<{width}}  ",
                                    subsequent_indent=" " * (len(indent) + width + 2)) for name, text in rows)


def scripts(folder: str) -> list[tuple[str, str]]:
    return [(p.stem, purpose(p)) for p in sorted((ROOT / folder).glob("*.py")) if not p.stem.startswith("_")]


def main(argv: list[str]) -> int:
    benchmarks = table(scripts("benchmarks"))
    if argv[:1] == ["bench"]:
        print("usage: ./uta bench NAME [args]   (./uta bench NAME --help for its options)\n\n"
              f"benchmarks:\n{benchmarks}")
        return 0
    pipelines = table([(f"pipelines/{name}.py", text) for name, text in scripts("pipelines")])
    print(f"usage: ./uta COMMAND [args]\n\ncommands:\n{table([(f'./uta {c}', t) for c, t in COMMANDS])}\n\n"
          f"pipelines (./uta python pipelines/NAME.py --help lists every key):\n{pipelines}\n\n"
          f"benchmarks (./uta bench NAME):\n{benchmarks}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
