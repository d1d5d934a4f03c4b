"""Issue 21 part 5: the gradient-signal diagnostics run on a schedule (``train.diagnostics_every``), not on every
iteration, and the schedule does not change the training.

Counts calls by monkeypatching ``fastnft.loop.trainer.gradient_signal`` on a small bandit run with the default
diagnostics settings; no wall-clock condition (the cost itself is measured in bench/diagnostics_cost.py).
"""

import dataclasses

import pytest
import torch
from bandit_helpers import torch_threads

import fastnft.loop.trainer as trainer_mod
from fastnft.config import ConfigError, TrainConfig, load_config
from fastnft.envs import make_env
from fastnft.metrics import read_jsonl
from fastnft.policies.state_flow import StateFlowPolicy

N = TrainConfig().diagnostics_every  # the default schedule
T = N + 2  # one scheduled iteration (N) between the first and the last


def _train(tmp, name, blob, cfg):
    """Train ``cfg``; returns (gradient_signal calls, train metric rows, final EMA weights)."""
    real = trainer_mod.gradient_signal
    calls: list[int] = []

    def counted(*a, **k):
        calls.append(1)
        return real(*a, **k)

    cfg = dataclasses.replace(cfg, run_dir=str(tmp / name))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trainer_mod, "gradient_signal", counted)
        trainer = trainer_mod.StepNFTTrainer(cfg, StateFlowPolicy.from_export(blob, cfg.policy), make_env(cfg.env),
                                             progress=False)
        trainer.train()
    rows = [r for r in read_jsonl(tmp / name / "metrics.jsonl") if r["kind"] == "train"]
    return len(calls), rows, {k: v.clone() for k, v in trainer.policy.state_dict().items()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same small bandit run with the default diagnostics, with ``diagnostics_every: 1`` and with them off."""
    from fastnft.envs.bandit import bandit_demo_dataset
    from fastnft.experiments.sft import build_policy

    cfg = load_config("configs/bandit_stepnft.yaml", [
        f"train.iterations={T}", "train.episodes_per_iter=16", "env.num_envs=16", "train.eval_every=0",
        "train.eval_episodes=16", "train.checkpoint_every=1000", "train.micro_batch=32", "policy.width=16",
        "policy.heads=2", "sft.num_demos=64"])
    data = bandit_demo_dataset(cfg.sft.num_demos, cfg.policy.horizon, seed=0)
    blob = build_policy(data, cfg.policy).export()  # no SFT: the schedule does not need a good start
    default = TrainConfig()
    assert cfg.train.diagnostics and cfg.train.diagnostics_every == default.diagnostics_every, \
        "the default run must use the default schedule"
    tmp = tmp_path_factory.mktemp("diag")
    out = {}
    with torch_threads(1):  # small models: one thread is as fast idle and far faster on a shared machine
        for name, kw in {"default": {}, "every": {"diagnostics_every": 1}, "off": {"diagnostics": False}}.items():
            out[name] = _train(tmp, name, blob, dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **kw)))
    return out


def test_default_schedule_runs_gradient_signal_on_first_scheduled_and_last_iterations(runs):
    calls, rows, _ = runs["default"]
    assert [r["iteration"] for r in rows] == list(range(1, T + 1))
    assert N > 2, "the default schedule must skip iterations"
    assert calls == 3, f"gradient_signal ran {calls} times in {T} iterations; expected 3 (iterations 1, {N}, {T})"
    assert [r["iteration"] for r in rows if "signal/cos_halves" in r] == [1, N, T]
    assert [r["iteration"] for r in rows if "time/actor/diagnostics" in r] == [1, N, T], \
        "skipped iterations must log no diagnostics time"
    for r in rows:  # every iteration logs its diagnostics share (fresh/replayed statistics run every iteration)
        assert 0.0 < r["perf/diagnostics_share"] <= 1.0 and "time/actor/loss_diagnostics" in r, r
        assert "fresh/loss" in r and "replayed/loss" in r


def test_schedule_every_iteration_and_off_leave_the_training_unchanged(runs):
    """``diagnostics_every: 1`` runs on every iteration, ``diagnostics: false`` never; the training (every metric
    but the diagnostics' own and the timings, and the final EMA weights) is identical in all three runs."""
    assert runs["every"][0] == T and runs["off"][0] == 0
    assert all("signal/cos_halves" in r for r in runs["every"][1])
    assert not any("signal/cos_halves" in r or "time/actor/diagnostics" in r for r in runs["off"][1])

    def strip(rows):
        return [{k: v for k, v in r.items() if not k.startswith(("signal/", "time/", "perf/", "wall"))}
                for r in rows]

    base_rows, base_state = strip(runs["off"][1]), runs["off"][2]
    for name in ("every", "default"):
        assert strip(runs[name][1]) == base_rows, f"diagnostics ({name}) changed the training metrics"
        assert all(torch.equal(runs[name][2][k], base_state[k]) for k in base_state), \
            f"diagnostics ({name}) changed the trained weights"


def test_diagnostics_at_and_validation():
    t = TrainConfig(iterations=60, diagnostics_every=20)
    assert [i for i in range(60) if t.diagnostics_at(i)] == [0, 19, 39, 59]
    t = TrainConfig(iterations=5, diagnostics_every=0)
    assert [i for i in range(5) if t.diagnostics_at(i)] == [0, 4]
    assert not any(TrainConfig(iterations=5, diagnostics=False).diagnostics_at(i) for i in range(5))
    with pytest.raises(ConfigError, match="train.diagnostics_every"):
        TrainConfig(diagnostics_every=-1)


class _Recorder(torch.nn.Module):
    """v = 0 * x_t + w; records which buffer rows (x_t[:, 0, 0] holds the row index) each call reads."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.seen: list[torch.Tensor] = []

    def forward(self, x_t, t, obs):
        self.seen.append(x_t[:, 0, 0].round().long())
        return 0 * x_t + self.w


@pytest.mark.parametrize("M", [1000, 100])
def test_loss_diagnostics_reads_at_most_max_rows_spread_over_the_buffer(M):
    """The fresh/replayed statistics run every iteration, so they read at most ``max_rows`` rows (the default 256),
    evenly spaced from the first to the last row; a smaller buffer is read whole."""
    from fastnft.config import NFTConfig
    from fastnft.loop.rollout import RolloutBuffer
    from fastnft.loop.update import loss_diagnostics
    from fastnft.sde import flow_sde_schedule

    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(M, 4, 2, generator=g)
    x_t[:, 0, 0] = torch.arange(M, dtype=torch.float32)
    buf = RolloutBuffer(obs=torch.randn(M, 3, generator=g), x_t=x_t, v_old=torch.zeros(M, 4, 2),
                        x_next=torch.randn(M, 4, 2, generator=g), x0=torch.zeros(M, 4, 2),
                        step=torch.randint(0, 4, (M,), generator=g), y=torch.ones(M),
                        episode=torch.arange(M))
    rec = _Recorder()
    d = loss_diagnostics(rec, buf, flow_sde_schedule(4, 0.3), NFTConfig(), 4, prefix="fresh/")
    rows = rec.seen[-1]
    assert "fresh/loss" in d
    if M <= 256:
        assert rows.tolist() == list(range(M))
    else:
        assert len(rows) == 256 and rows.unique().numel() == 256
        step = -(-M // 256)  # ceil(M / 256)
        assert rows[0] == 0 and rows[-1] >= M - step, "the subset must reach the buffer's last rows"
        assert (rows.diff() <= step).all(), "evenly spaced, not the first rows only"
