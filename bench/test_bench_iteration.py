"""One π-StepNFT training iteration, in parts: the simulator alone, rollouts with the policy, the actor update.

    pytest bench/test_bench_iteration.py --benchmark-json=bench/iteration.json

* ``sim_random``: ManiSkill3 PickCube-v1, N envs stepping uniform random actions (the simulator's own speed).
* ``rollout``: the same envs driven by the flow policy (K-step Flow-SDE sampling, S3 recording, chunked execution).
  ``extra_info["policy_share"] = 1 - rollout_rate / sim_rate`` is the share of rollout time spent outside the
  simulator (policy + bookkeeping); the project's goal is <= 25 %. ``timed_policy_share`` is the directly timed
  ``rollout/sample`` phase over the rollout time.
* ``update``: update epochs over a synthetic rollout buffer through the DeepSpeed actor engine; samples/s.

Env-steps/s figures are per process (CPU: N single-env subprocesses). Results are keyed by the device name.
"""

from __future__ import annotations

import time

import pytest
import torch

from fastnft.config import ExperimentConfig, load_config
from fastnft.loop.rollout import RolloutBuffer, run_episodes
from fastnft.nft import stepnft_loss
from fastnft.policies.state_flow import StateFlowPolicy
from fastnft.sde import flow_sde_schedule

N_ENVS = 8
SEEDS = list(range(2_000_000, 2_000_000 + N_ENVS))


def _cfg() -> ExperimentConfig:
    return load_config("configs/pickcube_stepnft.yaml", [f"env.num_envs={N_ENVS}"])


@pytest.fixture(scope="module", autouse=True)
def _keep_torch_threads():
    # DeepSpeed / ManiSkill start-up lowers torch's intra-op threads; restore them for the benchmarks that follow
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def env():
    ms = pytest.importorskip("fastnft.envs.maniskill")
    ok, why = ms.vulkan_available()
    if not ok:
        pytest.skip(f"no Vulkan device for SAPIEN: {why}")
    from fastnft.envs import make_env

    e = make_env(_cfg().env)
    yield e
    e.close()


@pytest.fixture(scope="module")
def rates() -> dict:
    return {}


def _random_episode_round(env) -> int:
    env.reset(SEEDS)
    g = torch.Generator().manual_seed(0)
    steps = 0
    lo, hi = env.action_low, env.action_high
    while not bool(env.done.all()):
        active = int((~env.done).sum())
        a = lo + (hi - lo) * torch.rand(env.num_envs, env.act_dim, generator=g)
        env.step(a)
        steps += active
    return steps


def test_sim_random(benchmark, env, rates):
    out = {}

    def run():
        t0 = time.perf_counter()
        out["steps"] = _random_episode_round(env)
        out["s"] = time.perf_counter() - t0

    benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
    rate = out["steps"] / out["s"]
    rates["sim"] = rate
    benchmark.extra_info.update({"env_steps_per_s": rate, "num_envs": env.num_envs, "device": "cpu"})


def test_rollout(benchmark, env, rates):
    cfg = _cfg()
    torch.manual_seed(0)
    policy = StateFlowPolicy(env.obs_dim, env.act_dim, cfg.policy)
    sch = flow_sde_schedule(cfg.policy.num_steps, cfg.nft.noise_level)
    out = {}

    def run():
        t0 = time.perf_counter()
        _, st = run_episodes(policy, env, sch, SEEDS, stochastic=True, record=True,
                             generator=torch.Generator().manual_seed(0), nft=cfg.nft)
        out["s"] = time.perf_counter() - t0
        out["stats"] = st

    benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
    st = out["stats"]
    rate = st.env_steps / out["s"]
    info = {"env_steps_per_s": rate, "num_envs": env.num_envs,
            "timed_policy_share": st.time.get("time/rollout/sample", 0.0) / out["s"]}
    if "sim" in rates:
        info["sim_env_steps_per_s"] = rates["sim"]
        info["policy_share"] = 1.0 - rate / rates["sim"]
    benchmark.extra_info.update(info)


def test_update(benchmark):
    from fastnft.engine import ActorEngine

    cfg = _cfg()
    obs_dim, act_dim, M = 42, 4, 4096
    torch.manual_seed(0)
    policy = StateFlowPolicy(obs_dim, act_dim, cfg.policy)
    engine = ActorEngine(policy, cfg.train, cfg.engine)
    H, D = cfg.policy.horizon, act_dim
    g = torch.Generator().manual_seed(0)
    buf = RolloutBuffer(obs=torch.randn(M, obs_dim, generator=g), x_t=torch.randn(M, H, D, generator=g),
                        v_old=torch.randn(M, H, D, generator=g), x_next=torch.randn(M, H, D, generator=g),
                        x0=torch.randn(M, H, D, generator=g), step=torch.randint(0, 4, (M,), generator=g),
                        y=torch.where(torch.rand(M, generator=g) < 0.5, -1.0, 1.0),
                        episode=torch.arange(M))
    buf = buf.to(engine.device)  # the data goes to the actor's device (CUDA on a GPU host)
    sch = flow_sde_schedule(cfg.policy.num_steps, cfg.nft.noise_level).to(device=engine.device, dtype=torch.float32)
    from fastnft.devices import make_generator
    from fastnft.loop.update import update_actor

    g = make_generator(engine.device, 0)

    def run():
        update_actor(engine, buf, sch, cfg.nft, cfg.policy.n_action_steps, update_epochs=1, micro_batch=cfg.train.micro_batch,
                     loss_fn=stepnft_loss, generator=g)

    benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update({"samples_per_s": M / benchmark.stats.stats.median, "micro_batch":
                                 cfg.train.micro_batch, "rows": M})
