"""``./uta test`` runs two lanes side by side (tests/run.py): which runs split, the exit status,
and pytest's record of failed tests afterwards."""

from __future__ import annotations

import pytest
from run import exit_status, merged_failures, one_process


@pytest.mark.parametrize("args, one", [
    ([], False),
    (["-q", "-rs", "--durations=15"], False),
    (["-k", "masking", "-m", "not slow"], False),
    (["tests/test_masking.py"], True),
    (["tests/test_masking.py::test_x", "-q"], True),
    (["--pdb"], True),
    (["--lane=cpu"], True),
    (["--lane", "cpu"], True),
    (["--lf"], True),
])
def test_a_run_naming_tests_or_needing_one_process_is_one_process(args, one, monkeypatch):
    monkeypatch.chdir(__file__.rpartition("/tests/")[0])
    assert one_process(args) is one


@pytest.mark.parametrize("codes, status", [
    ([0, 0], 0), ([0, 5], 0), ([5, 0], 0), ([5, 5], 5), ([1, 0], 1), ([0, 1], 1), ([5, 1], 1), ([2, 1], 2),
])
def test_the_exit_status_fails_when_a_lane_fails_and_not_for_a_lane_that_selected_nothing(codes, status):
    assert exit_status(codes) == status


def test_the_failed_tests_recorded_are_both_lanes_current_ones():
    before = {"cpu_fixed": True, "cpu_again": True, "ray_fixed": True, "unrun": True}
    ray = {"cpu_fixed": True, "cpu_again": True, "unrun": True, "ray_new": True}  # the cpu lane's as before
    cpu = {"cpu_again": True, "ray_fixed": True, "unrun": True, "cpu_new": True}  # the ray lane's as before
    assert merged_failures(before, ray, cpu) == {"cpu_again": True, "unrun": True, "ray_new": True, "cpu_new": True}
