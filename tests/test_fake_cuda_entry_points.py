"""Every entry point's device logic on fake CUDA (issue 16, part 2): ``sft``, ``train`` (state policy and tiny pi0),
``eval``, ``pipeline`` and ``grid`` on the bandit, each under ``fastnft.testing.fakecuda.fake_cuda`` with the
generator audit (a generator on another device type than the tensor it draws is recorded).

What stays outside fake CUDA, and why (see tests/test_device_fake_cuda.py for the mechanism):
- host-side data preparation (the bandit's demonstration chunks, the policy's fresh weights and normalisers) is
  built before the block: boolean masks on host data have data-dependent sizes FakeTensorMode cannot give. The
  entry point receives them through the function it would call (monkeypatched), then runs as on a GPU host;
- autograd aborts the process on a CUDA tensor of a CPU build of torch: parameters are frozen, ``backward`` gives
  each one a zero gradient on its device, and DeepSpeed is the plain-torch stand-in of test_device_fake_cuda;
- the process group (``init_distributed``; NCCL needs a GPU) is recorded, not made, and files that would hold
  fake tensors (checkpoints, policy files) are captured instead of written.
Fake tensors carry no values: these tests check devices, generators and that the code paths run, never numbers.

Each test runs in a fresh pytest process (:func:`_isolated`): after several entry points had run on fake CUDA in
one process, Python's garbage collector crashed the interpreter (segmentation fault) at a later collection, which
would take the whole test session down. Each test alone exits cleanly.

G1 (the SFT crash on any GPU host: a CPU generator drawing CUDA noise) fails ``test_sft_on_fake_cuda`` when reverted.
"""

from __future__ import annotations

import argparse
import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_device_fake_cuda import CUDA0, _engine_factory

import fastnft.engine as fengine
import fastnft.experiments.sft as sft_mod
import fastnft.loop.trainer as trainer_mod
import fastnft.policies.io as pio
from fastnft.config import load_config
from fastnft.engine import dist as fdist
from fastnft.envs import bandit as bandit_mod
from fastnft.policies import factory
from fastnft.testing.fakecuda import fake_cuda

BANDIT = "configs/bandit_stepnft.yaml"
SMALL = ["device=cuda", "engine.kernels=torch", "env.num_envs=8", "train.episodes_per_iter=8",
         "train.eval_episodes=8", "train.iterations=1", "train.eval_every=0", "train.checkpoint_every=1",
         "train.micro_batch=8", "train.diagnostics=false", "policy.width=16", "policy.heads=2", "sft.steps=3",
         "sft.num_demos=32", "sft.batch_size=8", "rollout.cuda_graphs=off"]


_CHILD = "FASTNFT_FAKE_CUDA_TEST"
REPO = Path(__file__).resolve().parents[1]


def _isolated(test):
    """Run ``test`` in a fresh ``pytest`` process (see the module docstring); the child runs the body."""
    @functools.wraps(test)
    def wrapper(*args, **kwargs):
        if os.environ.get(_CHILD) == test.__name__:
            return test(*args, **kwargs)
        env = {**os.environ, _CHILD: test.__name__, "PYTHONPATH": str(REPO)}
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                               f"{__file__}::{test.__name__}"], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=600, check=False)
        assert proc.returncode == 0 and " passed" in proc.stdout, proc.stdout[-6000:] + proc.stderr[-2000:]
        return None
    return wrapper


def _frozen_engine(module, train_cfg, engine_cfg, ds_overrides=None, device=None):
    eng = _engine_factory(module, train_cfg, engine_cfg, ds_overrides, device)
    module.requires_grad_(False)  # after the EMA copy and the engine's names: no autograd on fake CUDA
    return eng


class _Host:
    """The patches every entry point needs, and what they observed."""

    def __init__(self, monkeypatch, tmp_path: Path) -> None:
        self.inits: list[torch.device] = []
        self.checkpoints: list[dict] = []
        self.saved_policies: list[torch.nn.Module] = []
        self.trained: list[torch.nn.Module] = []
        self.grad_devices: set[torch.device] = set()
        monkeypatch.setattr(fengine, "ActorEngine", _frozen_engine)
        monkeypatch.setattr(fdist, "init_distributed", lambda backend=None, device=None: self.inits.append(
            torch.device(device)) or (0, 1))
        monkeypatch.setattr(trainer_mod, "save_checkpoint", lambda run_dir, it, state, **k: self.checkpoints.append(
            state))
        monkeypatch.setattr(pio, "save_final_policy", lambda policy, run_dir, meta: Path(run_dir) / "policy_final")
        monkeypatch.setattr(sft_mod, "save_policy", lambda path, policy, meta: self.saved_policies.append(policy))
        host = self

        def backward(loss, *args, **kwargs):  # the SFT step's backward (the trainer's goes through the engine)
            for p in host.trained[-1].parameters():  # the policy the running SFT stage took last
                host.grad_devices.add(p.device)
                p.grad = torch.zeros_like(p)

        monkeypatch.setattr(torch.Tensor, "backward", backward)
        self.tmp_path = tmp_path

    def cfg(self, *extra: str, path: str = BANDIT):
        return load_config(path, [*SMALL, f"run_dir={self.tmp_path / 'run'}", f"data_dir={self.tmp_path / 'data'}",
                                  *extra])

    def sft_inputs(self, monkeypatch, cfg, stages: int = 1) -> torch.nn.Module:
        """The bandit demos and a fresh SFT policy per SFT stage, built on the host; the stages receive them."""
        data = bandit_mod.bandit_demo_dataset(cfg.sft.num_demos, cfg.policy.horizon, seed=cfg.demos.seed)
        fresh = [sft_mod.build_policy(data, cfg.policy, seed=cfg.sft.seed).requires_grad_(False)
                 for _ in range(stages)]
        queue = list(fresh)

        def take(*args, **kwargs):
            self.trained.append(queue.pop(0))
            return self.trained[-1]

        monkeypatch.setattr(bandit_mod, "bandit_demo_dataset", lambda *a, **k: data)
        monkeypatch.setattr(sft_mod, "build_policy", take)
        return fresh[0]

    def sft_file_policy(self, monkeypatch, cfg) -> None:
        """``load_policy`` of the SFT file returns a host policy (as loaded from disk, real CPU weights)."""
        data = bandit_mod.bandit_demo_dataset(cfg.sft.num_demos, cfg.policy.horizon, seed=cfg.demos.seed)
        policies = [sft_mod.build_policy(data, cfg.policy, seed=0) for _ in range(2)]  # pipeline, grid

        def load(path, cfg_=None):
            # fake tensors cannot be deep-copied from real ones (the EMA copy): hand over the moved policy, as the
            # engine would move it right after the EMA copy
            return policies.pop(0).to(CUDA0), {"key": None}

        monkeypatch.setattr(pio, "load_policy", load)
        monkeypatch.setattr(factory, "load_policy", load, raising=False)
        import fastnft.experiments.grid as grid_mod
        import fastnft.experiments.pipeline as pipe_mod

        monkeypatch.setattr(sft_mod, "load_policy", load)
        for mod in (pipe_mod, grid_mod):
            monkeypatch.setattr(mod, "load_policy", load, raising=False)


def _clean(fc) -> None:
    assert fc.draws > 0, "no audited draw: the entry point drew nothing with a generator"
    assert fc.generator_mismatches == [], fc.generator_mismatches


@_isolated
def test_sft_on_fake_cuda(tmp_path, monkeypatch):
    """G1: ``fastnft sft`` on a GPU host trains with a generator on the GPU (it used to build a CPU one)."""
    host = _Host(monkeypatch, tmp_path)
    cfg = host.cfg()
    policy = host.sft_inputs(monkeypatch, cfg)
    with fake_cuda() as fc:
        _path, meta = sft_mod.run_sft_stage(cfg, force=True, progress=False)
    _clean(fc)
    assert fc.draws == 3 * cfg.sft.steps  # batch indices, t and noise per step, all on the device's generator
    assert host.grad_devices == {CUDA0}  # the step ran on the device
    assert len(meta["loss_history"]) == 1 and host.saved_policies == [policy]
    assert all(p.device.type == "cpu" for p in policy.parameters())  # written from CPU


@_isolated
def test_flow_matching_loss_refuses_a_cpu_generator_for_cuda_draws(monkeypatch):
    from fastnft.config import PolicyConfig
    from fastnft.policies.state_flow import StateFlowPolicy

    torch.manual_seed(0)
    policy = StateFlowPolicy(4, 2, PolicyConfig(horizon=4, n_action_steps=4, width=16, depth=1, heads=2))
    with fake_cuda():
        policy.to(CUDA0).requires_grad_(False)
        obs, act = torch.randn(3, 4, device=CUDA0), torch.randn(3, 4, 2, device=CUDA0)
        with pytest.raises(ValueError, match="make_generator"):
            sft_mod.flow_matching_loss(policy, obs, act, generator=torch.Generator())


def _train_args(cfg_path: str, overrides: list[str]) -> argparse.Namespace:
    return argparse.Namespace(config=cfg_path, overrides=overrides, init=None, resume=False, dry_run=False,
                              no_progress=True, profile_steps=None, local_rank=None)


@_isolated
def test_train_state_policy_on_fake_cuda(tmp_path, monkeypatch):
    from fastnft.train import run_train

    host = _Host(monkeypatch, tmp_path)
    cfg = host.cfg()
    data = bandit_mod.bandit_demo_dataset(cfg.sft.num_demos, cfg.policy.horizon, seed=cfg.demos.seed)
    policy = sft_mod.build_policy(data, cfg.policy)  # the SFT file's policy, as loaded on the host
    monkeypatch.setattr(factory, "build_flow_policy", lambda *a, **k: policy.to(CUDA0))
    with fake_cuda() as fc:
        out = run_train(_train_args(BANDIT, [*SMALL, f"run_dir={tmp_path / 'run'}"]))
    assert len(out["history"]) == 2  # the start and the end evaluation
    _clean(fc)
    assert host.inits == [CUDA0]
    state = host.checkpoints[-1]
    for part in ("actor", "ema"):
        assert all(t.device.type == "cpu" for t in state[part]["params"].values())
    assert state["rng_device"] == "cuda"


@_isolated
def test_train_tiny_pi0_on_fake_cuda(tmp_path, monkeypatch):
    """The tiny pi0 (camera frames, processor, prefix, expert) through rollout, update and evaluation."""
    import fastnft.envs as envs_mod
    from fastnft.envs.base import STATE_KEY, TASK_KEY, VectorEnv, image_key
    from fastnft.train import run_train

    class FrameEnv(VectorEnv):
        """uint8 frames, state and instruction on the device (ManiSkill's GPU scene)."""

        def __init__(self, n: int) -> None:
            super().__init__()
            self.device = CUDA0
            self.num_envs, self.obs_dim, self.act_dim, self.max_episode_steps = n, 3, 2, 8
            self.action_low, self.action_high = -torch.ones(2), torch.ones(2)

        def _frame(self):
            n = self.num_envs
            return {image_key("cam"): torch.zeros(n, 12, 10, 3, dtype=torch.uint8, device=CUDA0),
                    STATE_KEY: torch.randn(n, 3, device=CUDA0), TASK_KEY: ["pick the cube"] * n}

        def _reset(self, seeds):
            return self._frame()

        def _step(self, actions):
            s = torch.rand(self.num_envs, device=CUDA0) > 0.5
            return self._frame(), s.float(), s

    host = _Host(monkeypatch, tmp_path)
    monkeypatch.setattr(envs_mod, "make_env", lambda cfg_env, num_envs=None: FrameEnv(cfg_env.num_envs))
    tiny = "configs/pickcube_pi0_tiny.yaml"
    overrides = ["device=cuda", "engine.kernels=torch", "env.cameras=[cam]", "env.num_envs=4",
                 "train.episodes_per_iter=4", "train.eval_episodes=4", "train.iterations=1", "env.max_episode_steps=8",
                 "rollout.cuda_graphs=off", "policy.pi0.attention=auto", f"run_dir={tmp_path / 'run'}",
                 # the buffer stores prefix contexts (tensors): with raw observations the instruction strings are
                 # host lists indexed by device rows, whose fake values cannot match the lists' lengths
                 "policy.pi0.prefix_mode=cached"]
    # built on the host (initialising PaliGemma op by op under FakeTensorMode takes minutes), as from a checkpoint
    policy = factory.build_flow_policy(load_config(tiny, overrides), init=None, state_dim=3, act_dim=2, seed=0)
    monkeypatch.setattr(factory, "build_flow_policy", lambda *a, **k: policy.to(CUDA0))
    with fake_cuda() as fc:
        out = run_train(_train_args(tiny, overrides))
    assert len(out["history"]) == 2 and host.inits == [CUDA0]
    _clean(fc)
    assert all(t.device.type == "cpu" for t in host.checkpoints[-1]["actor"]["params"].values())


@_isolated
def test_eval_on_fake_cuda(tmp_path, monkeypatch, capsys):
    from fastnft.cli import main

    host = _Host(monkeypatch, tmp_path)
    cfg = host.cfg()
    data = bandit_mod.bandit_demo_dataset(cfg.sft.num_demos, cfg.policy.horizon, seed=cfg.demos.seed)
    # frozen: fake CUDA parameters that require grad can abort the process later (autograd needs the CUDA library)
    policy = sft_mod.build_policy(data, cfg.policy).requires_grad_(False)
    monkeypatch.setattr(pio, "load_policy", lambda path, cfg_=None: (policy, {}))
    args = ["eval", "--config", BANDIT, "--policy", str(tmp_path / "p.pt"), "--episodes", "8"]
    for o in [*SMALL, f"run_dir={tmp_path / 'run'}"]:
        args += ["--set", o]
    with fake_cuda() as fc:
        assert main(args) in (0, None)
    _clean(fc)
    assert all(p.device == CUDA0 for p in policy.parameters())
    assert "success_rate" in capsys.readouterr().out


@_isolated
def test_pipeline_and_grid_on_fake_cuda(tmp_path, monkeypatch):
    """``fastnft pipeline`` (SFT, then training) and ``fastnft grid`` (one run) on the bandit."""
    import fastnft.experiments.grid as grid_mod
    from fastnft.experiments.pipeline import run_pipeline

    host = _Host(monkeypatch, tmp_path)
    cfg = host.cfg()
    host.sft_file_policy(monkeypatch, cfg)  # first: it builds with the real build_policy
    host.sft_inputs(monkeypatch, cfg, stages=2)  # the pipeline's SFT stage and the grid's
    with fake_cuda() as fc:
        report = run_pipeline(cfg, progress=False)
    _clean(fc)
    assert report["stepnft"] and host.inits == [CUDA0] and host.grad_devices == {CUDA0}
    spec_path = tmp_path / "grid.yaml"
    overrides = ", ".join([*SMALL, f"data_dir={tmp_path / 'data'}"])
    spec_path.write_text(f"base_config: {BANDIT}\nresults_dir: {tmp_path / 'results'}\nrun_root: {tmp_path / 'runs'}\n"
                         f"overrides: [{overrides}]\nstarts:\n  a: []\narms:\n  - {{name: stepnft, seeds: [0]}}\n")
    spec = grid_mod.load_grid_spec(spec_path)
    monkeypatch.setattr(grid_mod, "_git_commit", lambda: "test")
    with fake_cuda() as fc:
        done = grid_mod.run_grid(spec, progress=False, force=True)
    _clean(fc)
    assert done and host.inits[-1] == CUDA0
