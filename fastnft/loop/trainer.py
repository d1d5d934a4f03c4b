"""The π-StepNFT training loop: EMA rollouts (S2-S4), actor updates (S5-S8), EMA update (S9), evaluation,
metrics and atomic checkpoints. ``fastnft/train.py`` only parses, builds and calls :meth:`StepNFTTrainer.train`.

Per iteration (DESIGN.md's data path): rollout with the EMA policy -> labels -> ``update_epochs`` passes of
shuffled micro-batches through the DeepSpeed actor engine -> ``theta_ema = d * theta_ema + (1 - d) * theta``.
Several ranks (``deepspeed``/``torchrun``) each run their own envs on disjoint seeds; gradients are averaged by
the engine, so the actor and the EMA copy stay identical across ranks.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
import torch.distributed as tdist
from tqdm.auto import tqdm

from fastnft.config import ExperimentConfig, config_to_dict
from fastnft.devices import check_precision, make_generator, resolve_device
from fastnft.engine import EMA, CheckpointError, config_fingerprint, ema_decay, load_latest, save_checkpoint
from fastnft.engine import dist as fdist
from fastnft.envs.base import VectorEnv
from fastnft.kernels import get_sde_step, get_stepnft_loss
from fastnft.loop.evaluate import evaluate_policy
from fastnft.loop.graphs import GraphedSampler
from fastnft.loop.rollout import run_episodes
from fastnft.loop.update import gradient_signal, loss_diagnostics, update_actor
from fastnft.metrics import MetricsWriter
from fastnft.nft import grpo_loss
from fastnft.policies.base import FlowPolicy
from fastnft.profiling import PhaseTimers, ProfileWindow
from fastnft.sde import flow_sde_schedule

__all__ = ["StepNFTTrainer"]

log = logging.getLogger(__name__)

PHASES = ("rollout_env", "rollout_policy", "rollout_other", "update", "diagnostics", "evaluation", "env_steps")
"""Keys of :attr:`StepNFTTrainer.phase_s`: wall seconds of env stepping and resets, policy calls in rollouts, the
rest of the rollout (recording, labels), actor update + EMA, gradient-signal diagnostics, held-out evaluation; and
the env steps the training episodes used (a count, for the rollout's env-steps/s)."""


def _eval_metrics(ev: dict) -> dict[str, float]:
    """The scalar entries of an evaluation (the per-episode outcome list stays in the history only)."""
    return {f"eval/{k}": v for k, v in ev.items() if isinstance(v, (int, float))}


class StepNFTTrainer:
    """Online π-StepNFT fine-tuning of a flow policy (or, with ``algo: grpo``, the Flow-GRPO reference on the same
    rollouts, engine and EMA).

    Args:
        cfg: the experiment config.
        policy: the initial policy (the SFT checkpoint); its weights become the actor and the EMA rollout policy.
        env: this rank's vector env, reused for rollouts and evaluation.
        resume: continue from ``cfg.run_dir``'s latest checkpoint (a fresh start when there is none).
        progress: show a tqdm bar on rank 0.
        profile_steps: ``"a:b"``: run iterations a..b-1 between cudaProfilerStart/Stop (profiling/README.md).

    Raises:
        fastnft.engine.CheckpointError: ``resume`` and the latest checkpoint belongs to another config.
        ValueError: training seeds would overlap the held-out evaluation seeds.
    """

    def __init__(self, cfg: ExperimentConfig, policy: FlowPolicy, env: VectorEnv, *, resume: bool = False,
                 progress: bool = True, profile_steps: str | None = None) -> None:
        from fastnft.engine import ActorEngine

        self.cfg, self.env, self.progress = cfg, env, progress
        self.profile = ProfileWindow(profile_steps)
        self.run_dir = Path(cfg.run_dir)
        device = resolve_device(cfg.device)
        check_precision(device, cfg.engine.dtype)
        if getattr(env, "backend", None) == "gpu":  # env.sim_backend auto resolved to gpu (gpu itself: the config)
            from fastnft.envs.maniskill import check_grouped_seeding

            check_grouped_seeding("gpu", cfg.nft.baseline == "group" or cfg.algo == "grpo")
        policy.set_precision(cfg.engine.dtype)  # before the EMA copy: rollouts run in the same precision
        self.ema = EMA(policy)  # before the engine: ZeRO-3 partitions the live parameters
        self.engine = ActorEngine(policy, cfg.train, cfg.engine, device=device)
        self.device = self.engine.device
        self.ema.module.to(self.device)
        self.rank, self.world = self.engine.rank, self.engine.world_size
        self.n_action_steps = policy.n_action_steps  # executed steps per policy call, SPEC's C
        K = cfg.policy.num_steps
        noise = cfg.nft.noise_level if cfg.nft.rollout == "sde" else 0.0
        self.rollout_sch = flow_sde_schedule(K, noise).to(device=self.device, dtype=torch.float32)
        # algo: grpo uses the PyTorch reference grpo_loss (no fused kernel); the buffer's labels are then advantages.
        self.grpo = cfg.grpo if cfg.algo == "grpo" else None
        self.loss_fn = grpo_loss if self.grpo else get_stepnft_loss(cfg.engine.kernels, self.device)
        self.step_fn = get_sde_step(cfg.engine.kernels, self.device)
        self.gen = make_generator(self.device, cfg.train.seed * 1000 + self.rank)
        self.sampler = GraphedSampler(self.ema.module, cfg.rollout.cuda_graphs)  # EMA updates are in place
        self.metrics = MetricsWriter(self.run_dir, enabled=self.engine.is_main)
        self.fingerprint = config_fingerprint(cfg)
        self.history: list[dict[str, float]] = []
        # Wall seconds per phase over the whole run (kept in checkpoints, so a resumed run adds on): where the hour
        # went, for report.json. Keys: PHASES.
        self.phase_s: dict[str, float] = dict.fromkeys(PHASES, 0.0)
        self.start_iter = 0
        last_train_seed = cfg.env.train_seed + cfg.train.iterations * self.world * cfg.train.episodes_per_iter
        if last_train_seed > cfg.env.eval_seed:
            raise ValueError(f"training seeds reach {last_train_seed} > env.eval_seed={cfg.env.eval_seed}: held-out "
                             "evaluation seeds would be trained on; raise env.eval_seed")
        if self.engine.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume:
            self._resume()

    # -- checkpoints ----------------------------------------------------------------------------------------------
    def _resume(self) -> None:
        found = load_latest(self.run_dir, fingerprint=self.fingerprint, required_keys=("actor", "ema", "rng"))
        if found is None:
            return
        it, state = found
        self.engine.load_checkpoint_state(state["actor"])
        self.ema.load_state_dict(state["ema"])
        saved_dev = state.get("rng_device", "cpu")  # checkpoints before the device-aware generators were CPU
        if saved_dev != self.device.type:  # a CPU generator's state does not load into a CUDA generator, and back
            raise CheckpointError(f"the checkpoint in {self.run_dir} holds {saved_dev} random generator states but "
                                  f"this run draws on {self.device}; resume on the same device type (set device:) "
                                  "or start a fresh run_dir")
        self.gen.set_state(state["rng"][self.rank] if self.rank < len(state["rng"]) else state["rng"][0])
        self.history = list(state.get("history", []))
        self.phase_s.update(state.get("phase_s", {}))
        self.start_iter = it
        self.metrics.truncate_after(it)

    def _save(self, it: int) -> None:
        actor = self.engine.state_dict_for_checkpoint()  # collective
        rng = fdist.all_gather_object(self.gen.get_state())
        save_checkpoint(self.run_dir, it, {"actor": actor, "ema": self.ema.state_dict(), "rng": rng,
                                           "rng_device": self.device.type,
                                           "history": self.history, "phase_s": self.phase_s,
                                           "config": config_to_dict(self.cfg)},
                        fingerprint=self.fingerprint)

    # -- seeds ----------------------------------------------------------------------------------------------------
    def train_seeds(self, it: int) -> list[int]:
        """This rank's episode seeds of iteration ``it`` (disjoint across ranks and iterations)."""
        E, G = self.cfg.train.episodes_per_iter, self.cfg.train.group_size
        base = self.cfg.env.train_seed + (it * self.world + self.rank) * (E // G)
        return [base + j // G for j in range(E)]  # G adjacent rollouts per initial state

    def eval_seeds(self) -> list[int]:
        """This rank's share of the held-out evaluation seeds."""
        n = self.cfg.train.eval_episodes
        return [self.cfg.env.eval_seed + j for j in range(n) if j % self.world == self.rank]

    def evaluate(self) -> dict[str, float]:
        """Held-out success rate of the EMA policy (the policy that would be deployed).

        The sampler noise is the same for every run and seed (``seed=0``), so runs from one start evaluate their
        start identically and their final policies can be compared episode by episode."""
        t0 = time.perf_counter()
        try:
            return self._evaluate()
        finally:
            self.phase_s["evaluation"] += time.perf_counter() - t0

    def _evaluate(self) -> dict[str, float]:
        return evaluate_policy(self.ema.module, self.env, self.eval_seeds(), self.cfg.policy.num_steps,
                               device=self.device, seed=0)  # same noise for every run: paired comparisons

    # -- one iteration ----------------------------------------------------------------------------------------------
    def iteration(self, it: int) -> dict[str, float]:
        """Rollout, update epochs, EMA update. Returns the iteration's metrics."""
        cfg, C = self.cfg, self.n_action_steps
        timers = PhaseTimers()
        t0 = time.perf_counter()
        buf, st = run_episodes(self.ema.module, self.env, self.rollout_sch, self.train_seeds(it), stochastic=True,
                               record=True, generator=self.gen, nft=cfg.nft, step_fn=self.step_fn, timers=timers,
                               device=self.device, group_size=cfg.train.group_size, sampler=self.sampler,
                               label_control=cfg.train.label_control, algo=cfg.algo, adv_eps=cfg.grpo.adv_eps)
        t_roll = time.perf_counter() - t0
        assert buf is not None
        if st.episodes_rerun:
            log.warning("iteration %d: %d episode(s) lost to a simulator worker that died were rerun from their "
                        "seeds (%s)", it, st.episodes_rerun, "; ".join(v.splitlines()[0] for v in
                                                                    self.env.failures.values()))
        # Every rank must take the same number of optimizer steps: trim to the smallest buffer.
        m = fdist.all_reduce(torch.tensor([len(buf)]), tdist.ReduceOp.MIN if tdist.is_available() else None)
        if int(m) < len(buf):
            buf = buf.index(torch.randperm(len(buf), generator=self.gen, device=self.device)[: int(m)])
        fresh = loss_diagnostics(self.engine.module, buf, self.rollout_sch, cfg.nft, C, prefix="fresh/",
                                 grpo=self.grpo)
        if cfg.train.diagnostics and self.engine.zero_stage < 3:
            with timers.range("actor/diagnostics"):
                fresh.update(gradient_signal(self.engine.module, buf, self.rollout_sch, cfg.nft, C,
                                             self.loss_fn, self.gen, grpo=self.grpo))
        lr = cfg.train.lr * (min(1.0, (it + 1) / cfg.train.lr_warmup) if cfg.train.lr_warmup else 1.0)
        self.engine.set_lr(lr)
        fresh["update/lr"] = lr
        with timers.range("actor/update"):
            upd = update_actor(self.engine, buf, self.rollout_sch, cfg.nft, C,
                               update_epochs=cfg.train.update_epochs, micro_batch=cfg.train.micro_batch,
                               loss_fn=self.loss_fn, generator=self.gen, grpo=self.grpo)
        replay = loss_diagnostics(self.engine.module, buf, self.rollout_sch, cfg.nft, C, prefix="replayed/",
                                  grpo=self.grpo)
        T = cfg.train.ema_horizon or cfg.train.iterations
        decay = ema_decay(it, T, cfg.train.ema_start, cfg.train.ema_end)
        with timers.range("actor/ema"):
            self.ema.update(self.engine.module, decay)
        counts = fdist.all_reduce(torch.tensor([st.successes, st.episodes, st.env_steps, len(buf),
                                                 int((buf.y > 0).sum()), st.sim_steps, st.episodes_rerun],
                                                dtype=torch.float64),
                                   tdist.ReduceOp.SUM if tdist.is_available() else None)
        succ, eps, env_steps, rows, pos, sim_steps, rerun = counts.tolist()
        self._last_env_steps = env_steps
        tm = timers.summary()
        self._add_phases(tm, t_roll)
        out = {"rollout/success_rate": succ / max(eps, 1), "rollout/episodes": eps, "rollout/samples": rows,
               "labels/positive_share": pos / max(rows, 1), "labels/zero_share": float((buf.y == 0).float().mean()),
               "ema/decay": decay,
               "rollout/episodes_rerun": rerun,  # episodes lost to a simulator worker that died, rerun
               "perf/env_steps_per_s": env_steps / max(t_roll, 1e-9), "perf/env_steps": env_steps,
               "perf/sim_steps": sim_steps, "perf/rollout_s": t_roll, "perf/iteration_s": time.perf_counter() - t0,
               **fresh, **replay, **upd, **tm}
        pol_t = tm.get("time/rollout/sample", 0.0)
        out["perf/policy_share_of_rollout"] = pol_t / max(t_roll, 1e-9)
        return out

    def _add_phases(self, tm: dict[str, float], t_roll: float) -> None:
        """Add one iteration's phase times (``time/<range>`` seconds from :class:`PhaseTimers`) to :attr:`phase_s`."""
        env = tm.get("time/env/step", 0.0) + tm.get("time/env/reset", 0.0)
        pol = tm.get("time/rollout/sample", 0.0)
        self.phase_s["rollout_env"] += env
        self.phase_s["rollout_policy"] += pol
        self.phase_s["rollout_other"] += max(t_roll - env - pol, 0.0)
        self.phase_s["update"] += tm.get("time/actor/update", 0.0) + tm.get("time/actor/ema", 0.0)
        self.phase_s["diagnostics"] += tm.get("time/actor/diagnostics", 0.0)
        self.phase_s["env_steps"] += self._last_env_steps

    # -- loop ------------------------------------------------------------------------------------------------------
    def train(self) -> list[dict[str, float]]:
        """Run iterations ``start_iter .. iterations-1`` with periodic evaluation and checkpoints.

        Returns:
            The evaluation history: ``[{"iteration", "success_rate", "ci_low", "ci_high", ...}]`` (iteration 0 is
            the initial policy).
        """
        cfg = self.cfg.train
        if self.start_iter == 0 and not self.history:
            ev = self.evaluate()
            self.history.append({"iteration": 0, **ev})
            self.metrics.log(0, _eval_metrics(ev), kind="eval")
        bar = tqdm(range(self.start_iter, cfg.iterations), desc=self.cfg.algo, initial=self.start_iter,
                   total=cfg.iterations, disable=not (self.progress and self.engine.is_main), mininterval=1.0)
        for it in bar:
            self.profile.before(it)
            m = self.iteration(it)
            self.profile.after(it)
            done = it + 1
            self.metrics.log(done, m)
            last = done == cfg.iterations
            postfix = {"roll": f"{m['rollout/success_rate']:.2f}", "pos": f"{m['labels/positive_share']:.2f}"}
            if (cfg.eval_every and done % cfg.eval_every == 0) or last:
                ev = self.evaluate()
                self.history.append({"iteration": done, **ev})
                self.metrics.log(done, _eval_metrics(ev), kind="eval")
                postfix["eval"] = f"{ev['success_rate']:.2f}"
            bar.set_postfix(postfix)
            if done % cfg.checkpoint_every == 0 or last:
                self._save(done)
        self.profile.close()
        self.metrics.close()
        if self.engine.is_main:
            from fastnft.policies.io import save_final_policy

            save_final_policy(self.ema.module, self.run_dir,  # type: ignore[arg-type]
                              {"task": self.cfg.env.task, "iteration": self.cfg.train.iterations, "kind": "stepnft_ema"})
        return self.history

    @property
    def policy(self) -> FlowPolicy:
        """The EMA rollout policy (what evaluation and deployment use)."""
        return self.ema.module  # type: ignore[return-value]

