"""Issue 6's evidence grid: spec parsing, run ids, paired intervals, and a tiny bandit grid end to end."""

import json

import pytest
import torch

from fastnft.config import ConfigError
from fastnft.experiments.grid import (
    grid_runs,
    load_grid_spec,
    result_path,
    reuse_finished_runs,
    run_grid,
    summarize_grid,
)
from fastnft.report import paired_diff_interval


def test_paired_interval_counts_only_changed_episodes():
    before = [0] * 100 + [1] * 100
    after = [1] * 10 + [0] * 90 + [1] * 100  # 10 episodes flipped to success, none lost
    d, lo, hi = paired_diff_interval(before, after)
    assert d == pytest.approx(0.05)
    sd = torch.tensor([1.0] * 10 + [0.0] * 190, dtype=torch.float64).std().item()
    assert hi - d == pytest.approx(1.96 * sd / 200 ** 0.5)
    assert lo > 0  # 10 gains and no loss among 200 paired episodes is significant
    assert paired_diff_interval(before, before) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="same seeds"):
        paired_diff_interval([1, 0], [1])


def _write(tmp_path, text, name="grid.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_spec_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="unknown keys"):
        load_grid_spec(_write(tmp_path, "base_config: a\nresults_dir: r\nrun_root: x\nstarts: {a: []}\n"
                                        "arms: [{name: s, seeds: [0]}]\nbogus: 1\n"))
    with pytest.raises(ConfigError, match="unknown starts"):
        load_grid_spec(_write(tmp_path, "base_config: a\nresults_dir: r\nrun_root: x\nstarts: {a: []}\n"
                                        "arms: [{name: s, seeds: [0], starts: [b]}]\n"))
    with pytest.raises(ConfigError, match="seeds"):
        load_grid_spec(_write(tmp_path, "base_config: a\nresults_dir: r\nrun_root: x\nstarts: {a: []}\n"
                                        "arms: [{name: s, seeds: []}]\n"))
    with pytest.raises(ConfigError, match="reuse_results"):
        load_grid_spec(_write(tmp_path, "base_config: a\nresults_dir: r\nrun_root: x\nstarts: {a: []}\n"
                                        "arms: [{name: s, seeds: [0]}]\nreuse_results: [results/grid]\n"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_grid_spec(tmp_path / "missing.yaml")


def test_committed_grid_has_the_minimum_runs():
    """Issue 6 part 6: StepNFT at every start x 2 seeds, shuffled at every start, zero labels at one start, GRPO at
    every start; at least 3 starts."""
    spec = load_grid_spec("configs/grids/pickcube.yaml")
    runs = grid_runs(spec)
    assert len(spec.starts) >= 3
    for start in spec.starts:
        arms = [r.arm for r in runs if r.start == start]
        assert arms.count("stepnft") >= 2 and "shuffled" in arms and "grpo" in arms, (start, arms)
    assert any(r.arm == "zero" for r in runs)
    assert len({r.run_id for r in runs}) == len(runs)


@pytest.mark.slow
def test_tiny_bandit_grid_end_to_end(tmp_path):
    res = tmp_path / "results"
    spec_path = _write(tmp_path, f"""
base_config: configs/bandit_stepnft.yaml
results_dir: {res}
run_root: {tmp_path / 'runs'}
overrides: [train.iterations=1, train.eval_every=0, train.eval_episodes=64, train.episodes_per_iter=64,
            env.num_envs=64, sft.steps=20, sft.num_demos=128, policy.width=32, policy.heads=2,
            train.micro_batch=64, data_dir={tmp_path / 'data'}]
starts:
  a: []
arms:
  - {{name: stepnft, seeds: [0]}}
  - {{name: zero, seeds: [0], overrides: [train.label_control=zero]}}
""")
    spec = load_grid_spec(spec_path)
    done = run_grid(spec, progress=False)
    assert done == ["a__stepnft__s0", "a__zero__s0"]
    r = json.loads(result_path(spec, "a__zero__s0").read_text())
    assert len(r["history"][0]["per_episode"]) == 64 and r["config"]["train"]["label_control"] == "zero"
    stepnft = json.loads(result_path(spec, "a__stepnft__s0").read_text())
    # one start, one evaluation noise: every run evaluates the start identically
    assert stepnft["history"][0]["per_episode"] == r["history"][0]["per_episode"]
    assert run_grid(spec, progress=False) == []  # finished runs are skipped
    s = summarize_grid(spec)
    assert s["runs_finished"] == 2 and set(s["arms"]) == {"stepnft", "zero"}
    assert "stepnft_minus_zero_s0" in s["starts"]["a"]
    assert (res / "curves.png").stat().st_size > 1000
    table = (res / "table.md").read_text()
    assert f"(`{(res / 'summary.json').as_posix()}`)" in table  # each table cites its own grid's summary
    d = s["starts"]["a"]["stepnft_minus_zero_s0"]
    assert f"| a | stepnft - zero_s0 | {d['points']:+.1f} ({d['ci95'][0]:+.1f} .. {d['ci95'][1]:+.1f})" in table
    z = s["arms"]["zero"]["runs"][0]
    # run time summed from the iterations themselves, so a resumed run counts all its segments
    assert z["iterations_min"] > 0 and z["iterations_min"] * 60 == pytest.approx(sum(r["per_iteration"]["perf/iteration_s"]))
    # the signal diagnostics (issue 6, part 4) reach the summary, per run
    assert z["diagnostics_mean"] == r["diagnostics_mean"] and "signal/cos_halves" in z["diagnostics_mean"]
    assert f"| zero | a | 0 | {100 * z['start_success']:.2f} % -> {100 * z['final_success']:.2f} % |" in table
    assert "| stepnft | 1 |" in table and "needs 2 runs" in table

    # a lever grid reuses this grid's finished run of the same id and settings, and reruns one whose differ
    lever_path = _write(tmp_path, spec_path.read_text().replace(f"results_dir: {res}", f"results_dir: {res}_lever")
                        .replace("train.label_control=zero]", "train.label_control=zero, train.lr=0.5]")
                        + f"reuse_results: {res}\n", name="lever.yaml")
    lever = load_grid_spec(lever_path)
    assert lever.reuse_results == str(res)
    assert reuse_finished_runs(lever) == ["a__stepnft__s0"]
    copy = json.loads(result_path(lever, "a__stepnft__s0").read_text())
    assert copy["reused_from"] == result_path(spec, "a__stepnft__s0").as_posix()
    assert copy["history"] == stepnft["history"]
    assert not result_path(lever, "a__zero__s0").exists()  # train.lr differs: not the same run
    assert reuse_finished_runs(lever) == []  # already there


@pytest.mark.parametrize("path", sorted(__import__("pathlib").Path("configs/grids").glob("*.yaml")), ids=str)
def test_shipped_grid_specs_load_and_their_runs_configure(path):
    """Every committed grid spec parses, and every run's overrides give a valid experiment config."""
    from fastnft.config import load_config

    spec = load_grid_spec(path)
    for r in grid_runs(spec):
        load_config(spec.base_config, r.overrides)


def test_results_grid_table_is_the_committed_grid_table():
    """RESULTS.md's grid table is results/grid/table.md verbatim (refresh: `fastnft grid --summarize`, then paste)."""
    from pathlib import Path

    table = Path("results/grid/table.md").read_text().rstrip("\n")
    assert table in Path("RESULTS.md").read_text()
