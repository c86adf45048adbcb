"""What a newcomer reads before running anything: ``--print-config`` of every pipeline and the demo
prints the defaults (a required key left empty is marked, never an error), and ``--help`` describes
every key in whole sentences (a comment continued on the next source line is not cut off)."""

from __future__ import annotations

import importlib
import re

import pytest
import yaml

PIPELINES = ["cache_teacher", "pretrain", "contrastive", "sweep", "export", "benchmark", "demo"]
REQUIRED = {"cache_teacher": "input.paths", "contrastive": "data.input.paths", "export": "model", "benchmark": "model"}


def main_of(job: str):
    return importlib.import_module(f"pipelines.{job}").main


@pytest.mark.parametrize("job", PIPELINES)
def test_print_config_prints_the_defaults_and_marks_what_is_still_required(job, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert main_of(job)(["--print-config"]) == 0
    out, err = capsys.readouterr()
    assert err == "" and not list(tmp_path.iterdir()), err  # printing writes nothing
    printed = yaml.safe_load(out)
    assert isinstance(printed, dict) and ("tracking" in printed or "tracking_uri" in printed), out
    key = REQUIRED.get(job)
    if key is None:
        assert not out.startswith("# not runnable"), out[:300]
        return
    assert out.startswith("# not runnable as it is: "), out[:300]
    marked = [line for line in out.splitlines() if line.endswith("# required: set it")]
    assert [line.strip().split(":")[0] for line in marked] == [key.split(".")[-1]], marked


def test_print_config_marks_the_nested_key_that_is_empty_not_a_namesake():
    from pipelines.lib.contrastive.config import ContrastiveJobConfig
    from uta_core.config import printable_config

    given = ["data.input.format=auto", "eval.input.paths=[x]", "eval.classnames=[a]", "eval.templates=['a {}']"]
    text = printable_config(ContrastiveJobConfig, None, given)
    marked = [line for line in text.splitlines() if "# required" in line]
    assert marked == ["    paths: []  # required: set it"], marked  # data.input.paths, at its depth


DANGLING = re.compile(r"(,|;|\(|\b(a|an|the|of|and|or|no|to|with|is|but))$")


@pytest.mark.parametrize("job", [j for j in PIPELINES if j != "demo"])
def test_every_help_line_is_a_whole_sentence(job, capsys):
    with pytest.raises(SystemExit):
        main_of(job)(["--help"])
    out = capsys.readouterr().out
    cut = [line.strip() for line in out.splitlines() if "  # " in line
           and (DANGLING.search(c := line.split("  # ", 1)[1].strip()) or c.count("(") != c.count(")"))]
    assert cut == []
    description = out.split("\n\n")[1]
    assert description.rstrip().endswith("."), description
