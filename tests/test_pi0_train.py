"""pi0 in the StepNFT loop (issue 8, parts 0 and 6): dict observations and cached prefixes through rollout and
update, the config / factory checks, and ``fastnft train --config configs/pickcube_pi0_tiny.yaml`` end to end on
ManiSkill3 cameras with kill -9 and ``--resume``."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from kill_helpers import kill_after_checkpoint

from fastnft.config import ConfigError, NFTConfig, load_config
from fastnft.engine.checkpoint import load_latest
from fastnft.envs.base import STATE_KEY, TASK_KEY, VectorEnv, image_key
from fastnft.loop.rollout import run_episodes
from fastnft.loop.update import buffer_loss
from fastnft.metrics import read_jsonl
from fastnft.nft import stepnft_loss
from fastnft.policies.factory import build_flow_policy
from fastnft.policies.pi0 import Pi0Policy, PrefixContext
from fastnft.policies.pi0_config import Pi0Config
from fastnft.policies.processor import Pi0Processor
from fastnft.policies.tokenizer import ByteTokenizer
from fastnft.sde import flow_sde_schedule

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "pickcube_pi0_tiny.yaml"
CAM = "cam"


class FrameEnv(VectorEnv):
    """Random uint8 frames, a 3-wide state and an instruction per env; env j succeeds at step ``succeed_at[j]``."""

    def __init__(self, succeed_at: list[int], max_steps: int = 8) -> None:
        super().__init__()
        self.num_envs, self.obs_dim, self.act_dim, self.max_episode_steps = len(succeed_at), 3, 2, max_steps
        self.action_low, self.action_high = -torch.ones(2), torch.ones(2)
        self.succeed_at = torch.tensor(succeed_at)
        self.g = torch.Generator().manual_seed(0)

    def _frames(self) -> dict:
        n = self.num_envs
        return {image_key(CAM): torch.randint(0, 256, (n, 12, 10, 3), generator=self.g, dtype=torch.uint8),
                STATE_KEY: torch.randn(n, 3, generator=self.g), TASK_KEY: ["pick the cube"] * n}

    def _reset(self, seeds):
        self.t = torch.zeros(self.num_envs, dtype=torch.long)
        return self._frames()

    def _step(self, actions):
        self.t += 1
        success = (self.succeed_at > 0) & (self.t == self.succeed_at)
        return self._frames(), success.float(), success


def _tiny_policy(prefix_mode: str) -> Pi0Policy:
    cfg = Pi0Config.tiny(cameras=(CAM,), state_dim=3, action_dim=2, prefix_mode=prefix_mode, tokenizer_max_length=8,
                         vlm=replace(Pi0Config.tiny().vlm, vocab_size=260))
    torch.manual_seed(0)
    return Pi0Policy(cfg, Pi0Processor(cfg, ByteTokenizer(cfg.tokenizer_max_length), norm_mode="identity"))


def _rollout(policy: Pi0Policy):
    env = FrameEnv([3, 0, 6, 0])
    return run_episodes(policy, env, flow_sde_schedule(4, 0.2), [0, 0, 1, 1], stochastic=True, record=True,
                        generator=torch.Generator().manual_seed(1), nft=NFTConfig(steps_per_call=2), group_size=2)


def test_rollout_stores_dict_observations_or_cached_prefixes_and_the_update_agrees():
    """The same rollout (same seeds, same weights) stored as raw observations and as prefix caches gives the same
    StepNFT loss: the update's prefix recompute equals the cached prefix."""
    raw_pol, cached_pol = _tiny_policy("recompute"), _tiny_policy("cached")
    cached_pol.load_state_dict(raw_pol.state_dict())
    buf_raw, st_raw = _rollout(raw_pol)
    buf_ctx, st_ctx = _rollout(cached_pol)
    assert st_raw.episode_success.tolist() == [True, False, True, False] == st_ctx.episode_success.tolist()
    assert isinstance(buf_raw.obs, dict) and isinstance(buf_ctx.obs, PrefixContext)
    M = len(buf_raw)
    assert M == len(buf_ctx) > 0
    assert buf_raw.obs[image_key(CAM)].shape[0] == M and len(buf_raw.obs[TASK_KEY]) == M
    assert buf_ctx.obs.batch_size == M
    torch.testing.assert_close(buf_raw.v_old, buf_ctx.v_old, rtol=0, atol=1e-5)
    sch = flow_sde_schedule(4, 0.2)
    rows = torch.tensor([M - 1, 0, 2])
    mb_raw, mb_ctx = buf_raw.index(rows), buf_ctx.index(rows)
    assert mb_raw.obs[TASK_KEY] == ["pick the cube"] * 3 and mb_ctx.obs.batch_size == 3
    nft = NFTConfig()
    l_raw = buffer_loss(raw_pol, mb_raw, sch, nft, raw_pol.n_action_steps, stepnft_loss)
    l_ctx = buffer_loss(cached_pol, mb_ctx, sch, nft, cached_pol.n_action_steps, stepnft_loss)
    assert torch.isfinite(l_raw)
    torch.testing.assert_close(l_raw, l_ctx, rtol=0, atol=1e-5)
    l_raw.backward()
    grads = {n for n, p in raw_pol.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads and all(".paligemma." not in n for n in grads), "only the expert and its projections may train"


def _tiny_cfg(*sets: str):
    return load_config(TINY, list(sets))


def test_config_and_factory_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="env.obs_mode"):
        _tiny_cfg("env.obs_mode=state")
    with pytest.raises(ConfigError, match="policy.kind"):
        load_config(REPO / "configs" / "pickcube_stepnft.yaml", ["policy.checkpoint=x"])
    with pytest.raises(ConfigError, match=r"policy\.pi0\.expert\.widht"):
        build_flow_policy(_tiny_cfg("policy.pi0.expert.widht=3"), init=None, state_dim=29, act_dim=4)
    with pytest.raises(ConfigError, match="set policy.num_steps"):
        build_flow_policy(_tiny_cfg("policy.pi0.num_steps=3"), init=None, state_dim=29, act_dim=4)
    with pytest.raises(ConfigError, match=r"'policy\.n_action_steps'.*chunk_size=6"):
        build_flow_policy(_tiny_cfg("policy.n_action_steps=7"), init=None, state_dim=29, act_dim=4)
    with pytest.raises(ConfigError, match="env.cameras"):
        build_flow_policy(_tiny_cfg("policy.pi0.cameras=[wrist]"), init=None, state_dim=29, act_dim=4)
    # A checkpoint whose state width does not fit the env is refused, naming the key and the env's width.
    pol = build_flow_policy(_tiny_cfg(), init=None, state_dim=5, act_dim=4)
    pol.save(tmp_path / "ck")
    from fastnft.policies.pi0_checkpoint import CheckpointError

    with_ck = _tiny_cfg(f"policy.checkpoint={tmp_path / 'ck'}")
    # With a checkpoint the architecture is the file's: the tiny YAML's architecture block is refused.
    with pytest.raises(CheckpointError, match=r"cannot override \[.chunk_size.*architecture fields"):
        build_flow_policy(with_ck, init=None, state_dim=29, act_dim=4)

    def runtime_only(**pi0):
        return replace(with_ck, policy=replace(with_ck.policy, pi0=pi0 or None))

    with pytest.raises(ConfigError, match="policy.pi0.state_dim=5 .* 29"):
        build_flow_policy(runtime_only(), init=None, state_dim=29, act_dim=4)
    ok = build_flow_policy(runtime_only(state_dim=29), init=None, state_dim=29, act_dim=4)
    assert ok.cfg.state_dim == 29 and ok.n_action_steps == 4


def test_random_init_is_seeded():
    a = build_flow_policy(_tiny_cfg(), init=None, state_dim=29, act_dim=4, seed=3)
    b = build_flow_policy(_tiny_cfg(), init=None, state_dim=29, act_dim=4, seed=3)
    c = build_flow_policy(_tiny_cfg(), init=None, state_dim=29, act_dim=4, seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


# -- end to end on ManiSkill3 cameras --------------------------------------------------------------------------------
try:
    from fastnft.envs.maniskill import vulkan_available

    _OK, _WHY = vulkan_available()
except Exception as e:  # noqa: BLE001  # pragma: no cover - broken install
    _OK, _WHY = False, f"fastnft.envs.maniskill does not import: {e}"


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "FASTNFT_SINGLE_PROCESS_PID"):
        env.pop(k, None)
    return env


def _cmd(run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "fastnft.cli", "train", "--config", str(TINY), "--no-progress",
            "--set", f"run_dir={run_dir}", "--set", "train.iterations=3", *extra]


@pytest.mark.slow
@pytest.mark.maniskill
@pytest.mark.skipif(not _OK, reason=f"ManiSkill3 unusable here: {_WHY}")
def test_fastnft_train_pi0_tiny_kill_9_and_resume(tmp_path):
    run = tmp_path / "run"
    killed_at = kill_after_checkpoint(_cmd(run), run, 1, env=_env(), cwd=REPO, log=tmp_path / "first.stderr")
    assert 1 <= killed_at < 3, f"the kill landed at iteration {killed_at}; the test needs a mid-run kill"

    out = subprocess.run(_cmd(run, "--resume"), capture_output=True, text=True, timeout=600, cwd=REPO, env=_env(),
                         check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    train = [r for r in read_jsonl(run / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["iteration"] for r in train] == [1, 2, 3], "resume must continue the killed run, no iteration twice"
    assert all(math.isfinite(r["fresh/loss"]) and r["rollout/episodes"] == 4 for r in train)
    assert any(r["kind"] == "eval" and r["iteration"] == 3 for r in read_jsonl(run / "metrics.jsonl"))

    # The EMA moved away from the (seeded) random start, and only in the trained expert.
    it, state = load_latest(run)
    assert it == 3
    start = build_flow_policy(load_config(TINY, [f"run_dir={run}"]), init=None, state_dim=29, act_dim=4,
                              seed=load_config(TINY).train.seed)
    init = dict(start.named_parameters())
    ema = state["ema"]["params"]
    assert ema and all(".paligemma." not in n for n in ema)
    assert max(float((ema[n] - init[n].detach()).abs().max()) for n in ema) > 0
    final = Pi0Policy.load(run / "policy_final")
    assert isinstance(final.processor.tokenizer, ByteTokenizer)
    for n, p in final.named_parameters():
        if n in ema:
            torch.testing.assert_close(p.detach(), ema[n], rtol=0, atol=0)
