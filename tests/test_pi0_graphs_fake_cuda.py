"""A graphed pi0 rollout and one update on fake CUDA (issue 22, part 3): the device audit of
tests/test_fake_cuda_entry_points.py with ``rollout.cuda_graphs=on``.

A CPU build of torch has no ``CUDAGraph``; the trainer's :class:`fastnft.loop.graphs.GraphedSampler` gets the CPU
stand-in :class:`fastnft.testing.graphs.RecordingGraphs` on the ``cuda`` device type instead, so the capture logic
(static prefix context, static solver indices, registered generator, replay into static outputs) runs on fake CUDA
tensors: any static buffer made on the wrong device, or a generator of the wrong device type, fails the audit.
Runs in a fresh pytest process, as every fake-CUDA entry point (see that module's docstring).
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

from test_device_fake_cuda import CUDA0
from test_fake_cuda_entry_points import _clean, _Host, _train_args

import fastnft.loop.graphs as graphs_mod
from fastnft.config import load_config
from fastnft.policies import factory
from fastnft.testing.fakecuda import fake_cuda
from fastnft.testing.graphs import RecordingGraphs

_CHILD = "FASTNFT_FAKE_CUDA_GRAPHS_TEST"
REPO = Path(__file__).resolve().parents[1]


def _isolated(test):
    """Run ``test`` in a fresh ``pytest`` process; the child runs the body."""
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


@_isolated
def test_graphed_tiny_pi0_rollout_and_update_on_fake_cuda(tmp_path, monkeypatch):
    import torch

    import fastnft.envs as envs_mod
    from fastnft.envs.base import STATE_KEY, TASK_KEY, VectorEnv, image_key
    from fastnft.train import run_train

    class FrameEnv(VectorEnv):
        """uint8 frames, state and instruction on the device."""

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
    graphs = RecordingGraphs(device_type="cuda")
    monkeypatch.setattr(graphs_mod, "_GRAPHS", graphs)
    monkeypatch.setattr(envs_mod, "make_env", lambda cfg_env, num_envs=None: FrameEnv(cfg_env.num_envs))
    tiny = "configs/pickcube_pi0_tiny.yaml"
    overrides = ["device=cuda", "engine.kernels=torch", "env.cameras=[cam]", "env.num_envs=4",
                 "train.episodes_per_iter=4", "train.eval_episodes=4", "train.iterations=1", "env.max_episode_steps=8",
                 "rollout.cuda_graphs=on", "policy.pi0.attention=auto", f"run_dir={tmp_path / 'run'}",
                 "policy.pi0.prefix_mode=cached"]  # the rollout encodes; the graphs replay the K-step loop
    policy = factory.build_flow_policy(load_config(tiny, overrides), init=None, state_dim=3, act_dim=2, seed=0)
    monkeypatch.setattr(factory, "build_flow_policy", lambda *a, **k: policy.to(CUDA0))
    with fake_cuda() as fc:
        out = run_train(_train_args(tiny, overrides))
    assert len(out["history"]) == 2 and host.inits == [CUDA0]
    _clean(fc)
    assert graphs.captured, "the trainer's sampler captured nothing: pi0 still runs eagerly"
    assert all(g.replays >= 1 for g in graphs.captured)  # each capture served at least its own call
    # the rollout passes per-episode noise and solver indices (nothing drawn: no generator registered); a graph
    # that draws registers the trainer's CUDA generator
    assert all(g is None or g.device.type == "cuda" for g in graphs.registered)
    for g in graphs.captured:  # the static output lives on the device
        assert all(t.device == CUDA0 for t in vars(g.out).values() if isinstance(t, torch.Tensor))
