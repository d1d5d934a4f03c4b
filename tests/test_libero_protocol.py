"""The LIBERO protocol's bookkeeping without a simulator: every planned pair run once, per-task / per-suite success
with Wilson intervals, the paper table, and resuming after a kill (mid-round and mid-write) with no episode run or
counted twice."""

from __future__ import annotations

import json

import pytest

from fastnft.experiments.libero_protocol import (
    EpisodeLog,
    parse_indices,
    parse_suites,
    run_libero_protocol,
    to_markdown,
)
from fastnft.report import wilson_interval


def _outcome(suite: str, t: int, k: int) -> bool:
    return (t + k + len(suite)) % 3 == 0


class Runner:
    """A fake round runner: records the pairs it ran; can be told to die after some rounds."""

    def __init__(self, die_after: int | None = None) -> None:
        self.ran: list[tuple[str, int, int]] = []
        self.die_after = die_after

    def __call__(self, suite, pairs):
        if self.die_after is not None and len(self.ran) >= self.die_after:
            raise KeyboardInterrupt("killed")
        self.ran += [(suite, t, k) for t, k in pairs]
        return [(_outcome(suite, t, k), 10 + t) for t, k in pairs]


SUITES2 = ["libero_object", "libero_goal"]


def test_full_plan_once_with_intervals(tmp_path):
    run = Runner()
    s = run_libero_protocol(run, tmp_path, SUITES2, tasks=[0, 1, 2], states=[0, 1, 2, 3], num_envs=5,
                            meta={"policy": "x"})
    assert sorted(run.ran) == sorted((su, t, k) for su in SUITES2 for t in range(3) for k in range(4))
    for su in SUITES2:
        v = s["suites"][su]
        want = sum(_outcome(su, t, k) for t in range(3) for k in range(4))
        assert (v["successes"], v["episodes"], v["planned"]) == (want, 12, 12)
        assert v["ci95"] == list(wilson_interval(want, 12))
        assert [r["successes"] for r in v["tasks"]] == [sum(_outcome(su, t, k) for k in range(4)) for t in range(3)]
    assert s["complete"] and s["average"] == pytest.approx(
        sum(s["suites"][su]["success_rate"] for su in SUITES2) / 2)
    assert "mujoco" in s["versions"] and "rlinf-libero" in s["versions"]
    on_disk = json.loads((tmp_path / "libero_results.json").read_text())
    assert on_disk["suites"]["libero_goal"]["successes"] == s["suites"]["libero_goal"]["successes"]
    md = (tmp_path / "libero_results.md").read_text()
    assert "| Policy | Object | Goal | Avg. |" in md and "## Goal (libero_goal)" in md


def test_resume_after_kill_runs_and_counts_each_episode_once(tmp_path):
    first = Runner(die_after=6)  # killed after 3 rounds of 2
    with pytest.raises(KeyboardInterrupt):
        run_libero_protocol(first, tmp_path, SUITES2, tasks=[0, 1], states=[0, 1, 2], num_envs=2, meta={"p": 1})
    assert len(first.ran) == 6
    # a kill in the middle of the next append leaves a torn line
    with open(tmp_path / "episodes.jsonl", "a") as f:
        f.write('{"suite": "libero_goal", "task": 1, "sta')
    second = Runner()
    s = run_libero_protocol(second, tmp_path, SUITES2, tasks=[0, 1], states=[0, 1, 2], num_envs=2, meta={"p": 1})
    assert set(first.ran).isdisjoint(second.ran) and len(first.ran) + len(second.ran) == 12
    assert s["complete"] and sum(v["episodes"] for v in s["suites"].values()) == 12
    # a duplicated record (e.g. a copy-paste of the log) is still counted once
    log = EpisodeLog(tmp_path / "episodes.jsonl")
    log.append([{"suite": "libero_object", "task": 0, "state": 0, "success": True, "steps": 1}])
    third = Runner()
    s3 = run_libero_protocol(third, tmp_path, SUITES2, tasks=[0, 1], states=[0, 1, 2], num_envs=2, meta={"p": 1})
    assert third.ran == [] and s3["suites"]["libero_object"]["episodes"] == 6
    assert s3["suites"]["libero_object"]["successes"] == s["suites"]["libero_object"]["successes"]


def test_resume_with_other_settings_is_refused(tmp_path):
    run_libero_protocol(Runner(), tmp_path, ["libero_object"], tasks=[0], states=[0], meta={"num_steps": 4})
    with pytest.raises(ValueError, match="other settings"):
        run_libero_protocol(Runner(), tmp_path, ["libero_object"], tasks=[0], states=[0], meta={"num_steps": 10})


def test_incomplete_table_says_so(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        run_libero_protocol(Runner(die_after=1), tmp_path, ["libero_10"], tasks=[0], states=[0, 1], meta={})
    s = json.loads((tmp_path / "libero_results.json").read_text())
    assert not s["complete"] and "Incomplete" in to_markdown(s)


def test_parsers():
    assert parse_suites("all", "libero_goal") == ["libero_spatial", "libero_object", "libero_goal", "libero_10"]
    assert parse_suites(None, "libero_goal") == ["libero_goal"]
    assert parse_indices("1,0", 10, "--tasks") == [0, 1] and parse_indices(None, 3, "--states") == [0, 1, 2]
    with pytest.raises(ValueError, match="--suites"):
        parse_suites("libero_90", "libero_goal")
    with pytest.raises(ValueError, match="--states"):
        parse_indices("50", 50, "--states")


def test_rounds_keep_each_worker_on_its_task():
    from fastnft.experiments.libero_protocol import _match_workers

    pairs = [(0, 1), (1, 1), (2, 1)]
    order = _match_workers(pairs, [2, 0, 1])  # the workers' current tasks
    assert [pairs[j][0] for j in order] == [2, 0, 1]
    assert sorted(_match_workers(pairs, [])) == [0, 1, 2]  # first round: any order
    order = _match_workers([(0, 1), (0, 2), (1, 1)], [1, 1, 1])
    assert sorted(order) == [0, 1, 2] and order[0] == 2
