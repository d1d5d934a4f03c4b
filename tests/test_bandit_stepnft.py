"""Algorithm test independent of the simulator: π-StepNFT on a synthetic contextual bandit.

A flow policy pre-trained to ~40-55 % success must reach a clearly higher success rate within seconds, over several
seeds, while the same run with labels shuffled (no information about which chunks succeeded) must not.
Everything runs through the real trainer: EMA rollouts, S3 tuples, S4 labels, DeepSpeed actor engine, S9.
"""

import dataclasses

import pytest
import torch
from bandit_helpers import BANDIT_THREADS, torch_threads

import fastnft.loop.trainer as trainer_mod
from fastnft.config import load_config
from fastnft.envs import make_env
from fastnft.loop.trainer import StepNFTTrainer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(tmp_path_factory, bandit_sft):
    with torch_threads(BANDIT_THREADS):  # one torch thread while this module trains (tests/conftest.py)
        yield _setup(tmp_path_factory, bandit_sft)


def _setup(tmp_path_factory, bandit_sft):
    cfg = load_config("configs/bandit_stepnft.yaml", [
        "sft.steps=400", "sft.num_demos=1024", "train.iterations=12", "train.episodes_per_iter=384",
        "train.eval_every=0", "train.eval_episodes=768", "env.num_envs=384", "train.checkpoint_every=100"])
    blob = bandit_sft(cfg)  # the SFT start, shared with the other bandit module (tests/conftest.py)
    env = make_env(cfg.env)
    return cfg, blob, env, tmp_path_factory.mktemp("bandit")


def _run(setup, seed, shuffle, monkeypatch):
    cfg, blob, env, tmp = setup
    from fastnft.policies.state_flow import StateFlowPolicy

    policy = StateFlowPolicy.from_export(blob, cfg.policy)
    cfg = dataclasses.replace(cfg, run_dir=str(tmp / f"s{seed}_{shuffle}"),
                              train=dataclasses.replace(cfg.train, seed=seed))
    if shuffle:
        real = trainer_mod.run_episodes

        def shuffled(*a, **k):
            buf, st = real(*a, **k)
            g = torch.Generator().manual_seed(seed)
            buf.y = buf.y[torch.randperm(len(buf), generator=g)]
            return buf, st

        monkeypatch.setattr(trainer_mod, "run_episodes", shuffled)
    hist = StepNFTTrainer(cfg, policy, env, progress=False).train()
    monkeypatch.undo()
    return hist[0]["success_rate"], hist[-1]["success_rate"]


@pytest.mark.parametrize("seed", [0, 1])
def test_stepnft_improves_bandit(setup, seed, monkeypatch):
    start, end = _run(setup, seed, shuffle=False, monkeypatch=monkeypatch)
    assert 0.25 < start < 0.7, f"SFT start {start:.3f} outside the intended range"
    assert end > start + 0.25, f"seed {seed}: success {start:.3f} -> {end:.3f}, expected a clear gain"


def test_shuffled_labels_do_not_improve(setup, monkeypatch):
    start, end = _run(setup, 0, shuffle=True, monkeypatch=monkeypatch)
    assert end < start + 0.08, f"shuffled labels: {start:.3f} -> {end:.3f}; without the success signal " \
                               "StepNFT must not improve"
