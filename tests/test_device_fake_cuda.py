"""Device truth on a CPU-only machine: one training iteration on fake CUDA tensors (issue 7, part 2).

``fastnft.testing.fakecuda.fake_cuda`` runs the block under FakeTensorMode with CUDA reported present: every tensor made
for the resolved device is a fake ``cuda:0`` tensor, and any op that mixes it with a CPU tensor raises. On top,
every draw that passes a generator is audited (generator device vs drawn tensor's device). The test drives the
real :class:`~fastnft.loop.trainer.StepNFTTrainer`: EMA rollouts with policy sampling on a device env, labels, the
update with the reference loss, the EMA update, evaluation, and the checkpoint state.

What cannot run on fake CUDA with a CPU build of torch, and how the test handles it:
- DeepSpeed needs a real accelerator: the real :class:`~fastnft.engine.zero.ActorEngine` methods run (train step,
  gradient norm, checkpoint state) over a plain-torch stand-in for the DeepSpeed engine (AdamW + clipping).
- autograd aborts the process on a CUDA tensor without the CUDA library, so the update runs its forward and the
  reference loss without a graph, and the stand-in's backward gives each parameter a zero gradient on its device.
- CUDA graphs need real streams (rollout.cuda_graphs=off here; tests/test_graphs.py has the GPU tests), and
  autocast to bf16 is disabled by torch for a CUDA device type on a CPU build, so the bf16 case checks devices,
  fp32 masters and the fp32 loss, not bf16 arithmetic (tests/test_bf16_resume.py runs bf16 on CPU).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import fastnft.engine as fengine
import fastnft.loop.trainer as trainer_mod
from fastnft.config import load_config
from fastnft.envs.base import VectorEnv
from fastnft.policies.state_flow import StateFlowPolicy
from fastnft.testing.fakecuda import fake_cuda

CUDA0 = torch.device("cuda", 0)


class DeviceEnv(VectorEnv):
    """A simulator whose outputs live on ``device`` (like ManiSkill's GPU scene): synthetic observations."""

    def __init__(self, num_envs: int, device: torch.device, max_steps: int = 8) -> None:
        super().__init__()
        self.device = device
        self.num_envs, self.obs_dim, self.act_dim, self.max_episode_steps = num_envs, 4, 2, max_steps
        self.action_low, self.action_high = -torch.ones(2), torch.ones(2)
        self.actions_seen: list[torch.device] = []

    def _reset(self, seeds):
        return torch.randn(self.num_envs, self.obs_dim, device=self.device)

    def _step(self, actions):
        self.actions_seen.append(actions.device)
        success = torch.rand(self.num_envs, device=self.device) > 0.5
        return torch.randn(self.num_envs, self.obs_dim, device=self.device), success.float(), success


class _DeepSpeedStandIn:
    """What ActorEngine uses of a DeepSpeedEngine, in plain torch (zero-stage-0 semantics)."""

    def __init__(self, module, train_cfg):
        self.module = module
        params = [p for p in module.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=train_cfg.lr, betas=train_cfg.betas, eps=train_cfg.eps,
                                           weight_decay=train_cfg.weight_decay)
        self.clip = train_cfg.grad_clip
        self.global_steps = 0
        self.losses: list[torch.Tensor] = []

    def backward(self, loss):
        self.losses.append(loss)
        for p in self.module.parameters():  # autograd cannot run on fake CUDA (see the module docstring)
            p.grad = torch.zeros_like(p)

    def step(self):
        torch.nn.utils.clip_grad_norm_(list(self.module.parameters()), self.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_steps += 1

    def get_lr(self):
        return [g["lr"] for g in self.optimizer.param_groups]

    def get_global_grad_norm(self):
        return None


def _engine_factory(module, train_cfg, engine_cfg, ds_overrides=None, device=None):
    from fastnft.devices import resolve_device
    from fastnft.engine.zero import ActorEngine

    eng = object.__new__(ActorEngine)
    eng.device = resolve_device("auto" if device is None else device)
    eng.zero_stage = 0
    eng._names = [n for n, p in module.named_parameters() if p.requires_grad]
    module.to(eng.device)
    eng._module = module
    eng.engine = _DeepSpeedStandIn(module, train_cfg)
    return eng


def _cfg(tmp_path, dtype: str):
    return load_config("configs/bandit_stepnft.yaml", [
        "device=cuda", "engine.kernels=torch", f"engine.dtype={dtype}", "env.num_envs=6",
        "train.episodes_per_iter=6", "train.eval_episodes=6", "policy.width=16", "policy.heads=2",
        "train.micro_batch=4", "env.max_episode_steps=8", f"run_dir={tmp_path / 'run'}",
        "rollout.cuda_graphs=off"])  # capturing needs real CUDA streams; the graphed path is a GPU test


def _fake_iteration(tmp_path, monkeypatch, dtype="float32"):
    """Build the trainer on fake cuda:0 and run one iteration + an evaluation; returns what was observed."""
    cfg = _cfg(tmp_path, dtype)
    monkeypatch.setattr(fengine, "ActorEngine", _engine_factory)
    bufs = []
    real_run = trainer_mod.run_episodes

    def capture(*a, **k):
        buf, st = real_run(*a, **k)
        bufs.append(buf)
        return buf, st

    monkeypatch.setattr(trainer_mod, "run_episodes", capture)
    torch.manual_seed(0)
    policy = StateFlowPolicy(4, 2, cfg.policy)  # real CPU weights, as loaded from an SFT file
    env = DeviceEnv(cfg.env.num_envs, CUDA0)
    with fake_cuda() as fc:
        # Fake tensors cannot be deep-copied from real ones, so the live policy moves first (the engine would move
        # it right after the EMA copy); the EMA copy and everything after it is the trainer's own doing.
        policy.to(CUDA0)
        trainer = trainer_mod.StepNFTTrainer(cfg, policy, env, progress=False)
        for p in trainer.engine.module.parameters():
            p.requires_grad_(False)  # the update runs without autograd (module docstring)
        metrics = trainer.iteration(0)
        ev = trainer.evaluate()
        state = {"actor": trainer.engine.state_dict_for_checkpoint(), "ema": trainer.ema.state_dict(),
                 "rng": trainer.gen.get_state()}
        syncs_before = fc.host_syncs
        env.reset(list(range(env.num_envs)))
        env.step_chunk(torch.zeros(env.num_envs, 3, env.act_dim, device=CUDA0))
        env_syncs = fc.host_syncs - syncs_before
    return {"cfg": cfg, "trainer": trainer, "metrics": metrics, "ev": ev, "state": state, "fc": fc, "buf": bufs[0],
            "env": env, "env_syncs": env_syncs, "losses": trainer.engine.engine.losses}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_one_iteration_on_fake_cuda(tmp_path, monkeypatch, dtype):
    out = _fake_iteration(tmp_path, monkeypatch, dtype)
    tr, fc = out["trainer"], out["fc"]
    assert tr.device == CUDA0 and not tr.sampler.enabled
    # generators live on the device they draw for, and every draw used one
    assert tr.gen.device == CUDA0
    assert fc.draws > 0 and fc.generator_mismatches == [], fc.generator_mismatches
    # policy, EMA copy and optimizer state on the device; weights stay fp32 masters in bf16 mode
    for name, p in [*tr.engine.module.named_parameters(), *tr.ema.module.named_parameters()]:
        assert p.device == CUDA0 and p.dtype == torch.float32, (name, p.device, p.dtype)
    for st in tr.engine.engine.optimizer.state.values():
        assert st["exp_avg"].device == CUDA0 and st["exp_avg"].dtype == torch.float32
    assert tr.engine.engine.global_steps >= 1
    # the rollout buffer never left the device; the env got its actions on its device
    buf = out["buf"]
    for f in dataclasses.fields(buf):
        assert getattr(buf, f.name).device == CUDA0, f.name
    assert out["env"].actions_seen and set(out["env"].actions_seen) == {CUDA0}
    # the update's loss is fp32 (SPEC S6) on the device, also when the policy computes in bf16
    assert out["losses"] and all(loss.device == CUDA0 and loss.dtype == torch.float32 for loss in out["losses"])
    assert "update/loss" in out["metrics"] and "success_rate" in out["ev"]
    # checkpoint state: plain CPU fp32 tensors (portable, and the fp32 masters in bf16 mode)
    for part in ("actor", "ema"):
        for name, t in out["state"][part]["params"].items():
            assert t.device.type == "cpu" and t.dtype == torch.float32, (part, name, t.device, t.dtype)
    for key in ("exp_avg", "exp_avg_sq"):
        assert all(t.device.type == "cpu" for t in out["state"]["actor"]["optim"][key].values())
    assert out["state"]["rng"].device.type == "cpu" and out["state"]["rng"].dtype == torch.uint8
    # a device env adds no host sync per env step
    assert out["env_syncs"] == 0


def test_generator_audit_catches_a_cpu_generator_on_fake_cuda():
    """The audit itself: a CPU generator drawing CUDA tensors is recorded, a matching one is not."""
    with fake_cuda() as fc:
        torch.randn(3, device=CUDA0, generator=torch.Generator(device=CUDA0))
        assert fc.generator_mismatches == []
        torch.randn(3, device=CUDA0, generator=torch.Generator())
    assert len(fc.generator_mismatches) == 1 and "cpu generator -> cuda:0 tensor" in fc.generator_mismatches[0]


def test_cpu_generator_for_cuda_draw_is_refused_by_the_policy():
    from fastnft.sde import flow_sde_schedule

    torch.manual_seed(0)
    policy = StateFlowPolicy(4, 2, _cfg_policy())
    with fake_cuda():
        policy.to(CUDA0)
        obs = torch.randn(3, 4, device=CUDA0)
        with pytest.raises(ValueError, match="make_generator"):
            policy.sample(obs, flow_sde_schedule(4, 0.2), stochastic=True, generator=torch.Generator())


def _cfg_policy():
    from fastnft.config import PolicyConfig

    return PolicyConfig(horizon=4, n_action_steps=4, width=16, depth=1, heads=2, num_steps=4)


def test_collectives_use_the_backends_device(monkeypatch):
    """With an NCCL group, the trainer's MIN, the evaluation's SUM and the metrics' mean all-reduce CUDA tensors
    (NCCL rejects CPU)."""
    import torch.distributed as tdist

    from fastnft.engine import dist as fdist
    from fastnft.engine.dist import all_reduce, all_reduce_mean

    seen = []
    monkeypatch.setattr(fdist, "is_initialized", lambda: True)
    monkeypatch.setattr(fdist, "world_size", lambda: 2)
    monkeypatch.setattr(tdist, "get_backend", lambda *a, **k: "nccl")
    monkeypatch.setattr(tdist, "all_reduce", lambda t, op=None: seen.append(t.device))
    with fake_cuda():
        out = all_reduce(torch.tensor([5, 7]), tdist.ReduceOp.MIN)
        assert out.device.type == "cpu"  # handed back on the caller's device
    assert seen == [CUDA0]
    with fake_cuda():  # the mean too (issue 16: it used to hand NCCL the caller's CPU tensor)
        host = torch.tensor([1.0, 3.0])
        assert all_reduce_mean(host) is host and host.device.type == "cpu"
    assert seen == [CUDA0, CUDA0]
    monkeypatch.setattr(tdist, "get_backend", lambda *a, **k: "gloo")
    all_reduce(torch.tensor([5.0]), tdist.ReduceOp.SUM)
    assert seen[-1].type == "cpu"
    mean = all_reduce_mean(torch.tensor([4.0]))
    assert seen[-1].type == "cpu" and mean.tolist() == [2.0]  # summed (stand-in: unchanged), divided by 2 ranks


def test_device_resolution_honours_cpu_and_local_rank(monkeypatch):
    from fastnft.devices import resolve_device

    with fake_cuda(num_gpus=2):
        assert resolve_device("cpu") == torch.device("cpu")
        monkeypatch.setenv("LOCAL_RANK", "1")
        assert resolve_device("auto") == torch.device("cuda", 1) == resolve_device("cuda")
        monkeypatch.setenv("LOCAL_RANK", "2")
        with pytest.raises(RuntimeError, match="2 CUDA device"):
            resolve_device("cuda")


def test_actor_engine_honours_device_cpu_on_a_cuda_host(monkeypatch):
    """`device: cpu` on a GPU host: the engine keeps the module on CPU (it used to take CUDA whenever present)."""
    from fastnft.config import EngineConfig, TrainConfig
    from fastnft.engine.zero import ActorEngine

    real = torch.cuda.is_available
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a CUDA host (no fake tensors needed)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    torch.manual_seed(0)
    module = torch.nn.Linear(3, 2)
    eng = ActorEngine(module, TrainConfig(), EngineConfig(), device="cpu")
    monkeypatch.setattr(torch.cuda, "is_available", real)
    assert eng.device == torch.device("cpu") and next(eng.module.parameters()).device.type == "cpu"
    info = eng.train_step(eng.module(torch.randn(4, 3)).pow(2).mean())
    assert info["grad_norm"] > 0


def test_resume_across_device_types_is_a_clear_error(tmp_path, monkeypatch):
    """A CPU run's checkpoint resumed with CUDA generators: the RNG state does not fit; say so and name the fix."""
    from fastnft.engine import EMA, CheckpointError, config_fingerprint, save_checkpoint

    cfg = _cfg(tmp_path, "float32")
    monkeypatch.setattr(fengine, "ActorEngine", _engine_factory)
    torch.manual_seed(0)
    policy = StateFlowPolicy(4, 2, cfg.policy)
    save_checkpoint(tmp_path / "run", 1, {"actor": {}, "ema": EMA(policy).state_dict(),
                                          "rng": [torch.Generator().get_state()], "rng_device": "cpu"},
                    fingerprint=config_fingerprint(cfg))
    with fake_cuda():
        policy.to(CUDA0)
        tr = trainer_mod.StepNFTTrainer(cfg, policy, DeviceEnv(6, CUDA0), progress=False)
        tr.engine.load_checkpoint_state = lambda s: None  # the actor part is not what this test is about
        with pytest.raises(CheckpointError, match="holds cpu random generator states"):
            tr._resume()


def test_bf16_on_a_pre_ampere_gpu_names_the_config_key(tmp_path, monkeypatch):
    """``engine.dtype: bfloat16`` on an sm_75 GPU (T4): a clear error before anything runs, not one inside autocast."""
    cfg = _cfg(tmp_path, "bfloat16")
    monkeypatch.setattr(fengine, "ActorEngine", _engine_factory)
    torch.manual_seed(0)
    policy = StateFlowPolicy(4, 2, cfg.policy)
    with fake_cuda(capability=(7, 5)):
        with pytest.raises(ValueError, match=r"engine.dtype: bfloat16 needs .* sm_75\. Fix: set engine.dtype: float32"):
            trainer_mod.StepNFTTrainer(cfg, policy, DeviceEnv(6, CUDA0), progress=False)
        from fastnft.devices import check_precision

        check_precision(CUDA0, "float32")
        check_precision("cpu", "bfloat16")
