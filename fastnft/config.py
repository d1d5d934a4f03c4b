"""Typed experiment configs (dataclasses), strict YAML loading and validation.

One YAML per experiment (``configs/``). Every field has a docstring; an unknown key, a wrong type or an out-of-range
value stops loading with a :class:`ConfigError` that names the key, the problem and the fix.

    cfg = load_config("configs/pickcube_stepnft.yaml", overrides=["train.iterations=3"])
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

__all__ = [
    "LIBERO_SUITES",
    "OBS_MODES",
    "TASK_INSTRUCTIONS",
    "ConfigError",
    "DemoConfig",
    "EngineConfig",
    "EnvConfig",
    "ExperimentConfig",
    "GRPOConfig",
    "NFTConfig",
    "PolicyConfig",
    "RolloutConfig",
    "SFTConfig",
    "TrainConfig",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "load_config",
]


class ConfigError(ValueError):
    """A config value is unknown, of the wrong type or out of range. The message names the key and the fix."""


def _require(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}': {msg}")


OBS_MODES = ("state", "rgb")
"""Valid ``env.obs_mode`` values."""

TASK_INSTRUCTIONS: dict[str, str] = {
    "PickCube-v1": "pick up the red cube and move it to the goal position",
    "PushCube-v1": "push the blue cube to the goal region in front of it",
    "PullCube-v1": "pull the blue cube back onto the goal region",
    "StackCube-v1": "pick up the red cube and stack it on top of the green cube",
    "PegInsertionSide-v1": "pick up the orange-white peg and insert its orange end into the hole in the box",
    "LiftPegUpright-v1": "lift the peg lying on the table into an upright position",
}
"""Built-in language instructions of ManiSkill3 tasks (ManiSkill gives none; these follow each task's description),
used by ``obs_mode: rgb`` when ``env.instruction`` is empty."""

LIBERO_SUITES: dict[str, int] = {"libero_spatial": 240, "libero_object": 240, "libero_goal": 320, "libero_10": 480}
"""LIBERO suites (``env.task``) and their default episode limits in env steps (``fastnft.envs.libero_suites``)."""

# Keys that were renamed: an old YAML or override gets the new name instead of "unknown key".
_RENAMED = {"policy.chunk": "policy.n_action_steps"}


@dataclass(kw_only=True)
class EnvConfig:
    """Vectorised simulator (SPEC notation: one env step executes one action of a chunk)."""

    task: str = "PickCube-v1"
    """Task id: a ManiSkill3 env id (``PickCube-v1``), a LIBERO suite (``libero_spatial``, ``libero_object``,
    ``libero_goal``, ``libero_10``; docs/libero.md) or ``bandit`` (synthetic contextual bandit, no simulator)."""
    control_mode: str = "pd_ee_delta_pos"
    """ManiSkill controller. ``pd_ee_delta_pos`` (end-effector deltas + gripper) is what the policy learns."""
    obs_mode: str = "state"
    """``state``: ``[N, obs_dim]`` float32 ground-truth state (what the state-based expert needs). ``rgb``: a dict
    of camera frames ``observation.images.<camera> [N, H, W, 3]`` uint8, the proprio + task state
    ``observation.state [N, state_dim]`` float32 and the language instruction ``task`` (N strings), for pi0-style
    policies. Demonstrations and SFT are state-only."""
    cameras: list[str] = field(default_factory=lambda: ["base_camera"])
    """ManiSkill sensor names whose RGB frames ``obs_mode: rgb`` returns, in this order (PickCube-v1 has one,
    ``base_camera``; a wrist camera needs a robot that has one, e.g. ``panda_wristcam``). LIBERO: ``agentview``
    and/or ``wrist``. Ignored for ``state``."""
    camera_slots: dict[str, str] = field(default_factory=dict)
    """LIBERO: observation key of each camera, ``{camera: slot}`` -> ``observation.images.<slot>``, so frames reach
    the policy's camera slots by name (e.g. ``{agentview: base_0_rgb, wrist: left_wrist_0_rgb}`` for an openpi
    checkpoint); a camera not listed keeps its own name. Ignored for ``state``."""
    image_size: int | None = None
    """Render every camera at ``image_size x image_size`` pixels (ManiSkill's ``sensor_configs``); null = the
    task's default (128 x 128 for PickCube-v1, 256 x 256 for LIBERO). Ignored for ``state``."""
    instruction: str = ""
    """Language instruction sent as ``task`` with ``obs_mode: rgb``; empty = the built-in one for the task
    (:data:`TASK_INSTRUCTIONS`). Ignored for ``state`` and for LIBERO (each env sends its own task's)."""
    max_episode_steps: int | None = None
    """Episode length limit in env steps; null = the task's default: 100 for ManiSkill and bandit tasks
    (PickCube-v1's own 50 cuts most motion-planned demos), 240 / 240 / 320 / 480 for LIBERO Spatial / Object /
    Goal / Long. Resolved when the config is built, so it is always an int afterwards."""
    num_envs: int = 8
    """Env slots: episodes run in parallel (on CPU: single-env simulator copies spread over ``num_workers``
    processes). An env whose episode ended starts the iteration's next episode at once."""
    num_workers: int | None = None
    """CPU simulators (ManiSkill's CPU backend, LIBERO): worker processes, each stepping ``num_envs /
    num_workers`` env copies in turn, one action chunk per round trip; null = one per usable core (at most
    ``num_envs``). Ignored by ``bandit`` and ManiSkill's GPU backend."""
    sim_backend: Literal["cpu", "gpu", "auto"] = "cpu"
    """ManiSkill physics backend: ``gpu`` batches all envs in one PhysX scene on the policy's GPU (co-located,
    outputs stay CUDA tensors); ``auto`` = gpu if CUDA else cpu. The default stays ``cpu`` until a GPU run has
    passed (``fastnft doctor``'s maniskill_gpu check)."""
    train_seed: int = 0
    """Training episodes use seeds ``train_seed + k`` (k counts episodes across iterations)."""
    eval_seed: int = 1_000_000
    """Held-out evaluation episodes use seeds ``eval_seed + j``; must not overlap any training/demo seed."""
    libero_split: Literal["shared", "heldout"] = "shared"
    """LIBERO: ``shared`` = training and evaluation draw from the same 500 (task, init state) pairs, as in the
    paper (LIBERO has no held-out init states); ``heldout`` = training uses states 0-39, evaluation (seeds >=
    ``eval_seed``) states 40-49."""
    delta_actions: bool = False
    """LIBERO: the policy outputs ``actions[:6] - state[:6]`` (RLinf's ``extra_delta_transform`` of its pi0
    LIBERO checkpoints; pi0.5's do not use it); the env adds ``observation.state[:6]`` of the observation the policy
    saw (the chunk's first) back to every action of the chunk before stepping (openpi's ``AbsoluteActions``)."""
    libero_gl: Literal["egl", "osmesa"] = "egl"
    """LIBERO: MuJoCo's offscreen GL backend (``MUJOCO_GL``, unless already set in the environment): ``egl``
    (Mesa llvmpipe on CPU, the NVIDIA driver on a GPU host) or ``osmesa``."""

    def __post_init__(self) -> None:
        libero = self.task in LIBERO_SUITES
        _require(libero or not self.delta_actions, "env.delta_actions", "applies to LIBERO suites only; remove it")
        if self.max_episode_steps is None:
            self.max_episode_steps = LIBERO_SUITES[self.task] if libero else 100
        _require(self.max_episode_steps >= 1, "env.max_episode_steps", "must be >= 1 (or null: the task's default)")
        _require(self.libero_split in ("shared", "heldout"), "env.libero_split",
                 f"must be 'shared' or 'heldout', got {self.libero_split!r}")
        _require(self.libero_gl in ("egl", "osmesa"), "env.libero_gl", f"must be 'egl' or 'osmesa', got {self.libero_gl!r}")
        if libero and self.obs_mode == "rgb":
            bad = [c for c in self.cameras if c not in ("agentview", "wrist")]
            _require(not bad, "env.cameras", f"LIBERO's cameras are 'agentview' and 'wrist', got {bad!r}; e.g. "
                     "env.cameras=[agentview,wrist]")
        _require(all(isinstance(k, str) and isinstance(v, str) and v for k, v in self.camera_slots.items()),
                 "env.camera_slots", f"must map camera names to slot names, got {self.camera_slots!r}")
        _require(set(self.camera_slots) <= set(self.cameras), "env.camera_slots",
                 f"names cameras not in env.cameras={self.cameras!r}: {sorted(set(self.camera_slots) - set(self.cameras))}")
        _require(self.num_envs >= 1, "env.num_envs", "must be >= 1")
        _require(self.num_workers is None or 1 <= self.num_workers <= self.num_envs, "env.num_workers",
                 f"must be null (one per core) or in 1..env.num_envs={self.num_envs}, got {self.num_workers!r}")
        _require(self.obs_mode in OBS_MODES, "env.obs_mode",
                 f"must be one of {', '.join(OBS_MODES)}, got {self.obs_mode!r}")
        if self.obs_mode == "rgb":
            _require(self.task != "bandit", "env.obs_mode",
                     "'rgb' needs a simulator with cameras; the 'bandit' task has none, set env.obs_mode: state")
            _require(len(self.cameras) >= 1 and all(isinstance(c, str) and c for c in self.cameras), "env.cameras",
                     f"'rgb' needs at least one camera name, got {self.cameras!r}; e.g. env.cameras=[base_camera]")
            _require(len(set(self.cameras)) == len(self.cameras), "env.cameras",
                     f"camera names must be distinct, got {self.cameras!r}")
            _require(libero or bool(self.instruction.strip()) or self.task in TASK_INSTRUCTIONS, "env.instruction",
                     f"task {self.task!r} has no built-in language instruction (known: "
                     f"{', '.join(TASK_INSTRUCTIONS)}); set env.instruction to the sentence the policy should see")
        _require(self.image_size is None or self.image_size >= 8, "env.image_size",
                 f"must be null (the task's default) or >= 8 pixels, got {self.image_size}")
        _require(self.eval_seed > self.train_seed, "env.eval_seed",
                 "must be larger than env.train_seed so held-out seeds stay disjoint from training seeds")

    def language_instruction(self) -> str:
        """The instruction sent as ``task``: :attr:`instruction`, or the task's entry of :data:`TASK_INSTRUCTIONS`.

        Raises:
            ConfigError: neither exists (names ``env.instruction``).
        """
        text = self.instruction.strip() or TASK_INSTRUCTIONS.get(self.task, "")
        _require(bool(text), "env.instruction", f"task {self.task!r} has no built-in language instruction; set it")
        return text


@dataclass(kw_only=True)
class PolicyConfig:
    """The flow policy: the state-based action expert (``kind: state_flow``, the embedded default) or pi0 / pi0.5
    (``kind: pi0``). ``num_steps`` and ``n_action_steps`` apply to both kinds; the architecture keys below them
    (horizon .. dropout) are the state expert's, pi0's come from its checkpoint or the ``pi0`` block."""

    kind: Literal["state_flow", "pi0"] = "state_flow"
    """``state_flow``: the small state-based expert, started from its SFT file. ``pi0``: pi0 / pi0.5 (frozen
    PaliGemma prefix + trained Gemma action expert) on camera frames, state and instruction (``env.obs_mode: rgb``)."""
    checkpoint: str | None = None
    """pi0 only: a local checkpoint directory in the openpi PyTorch / lerobot layout (``model.safetensors``,
    ``config.json``, ``tokenizer.model``); null = a randomly initialised model of the ``pi0`` block's architecture
    (CPU smoke runs and tests)."""
    pi0: dict | None = None
    """pi0 only: fields of :class:`fastnft.policies.pi0_config.Pi0Config`. With a checkpoint only its runtime fields
    (attention, prefix_mode, vlm_dtype, cameras, state_dim, action_dim); without one, the whole architecture.
    Checked when the policy is built (``fastnft train --dry-run``); errors name ``policy.pi0.<key>``."""
    horizon: int = 8
    """Action horizon H: tokens predicted per policy call (lerobot's ``chunk_size``)."""
    n_action_steps: int = 5
    """Executed steps C <= H: actions executed (and supervised) per policy call (lerobot's name; was ``chunk``)."""
    action_pad: int = 0
    """Pad the action dim to this width D (pi0 uses 32); 0 = no padding (D = the env's action dim)."""
    width: int = 128
    """Transformer width (token embedding size)."""
    depth: int = 3
    """Number of transformer blocks."""
    heads: int = 4
    """Attention heads; must divide ``width``."""
    mlp_ratio: float = 4.0
    """Hidden size of the block MLP as a multiple of ``width``."""
    dropout: float = 0.0
    """Dropout inside the blocks (0 keeps rollouts and updates consistent)."""
    num_steps: int = 4
    """Denoising steps K of the sampler (SPEC S1)."""

    def __post_init__(self) -> None:
        _require(self.horizon >= 1, "policy.horizon", "must be >= 1")
        _require(self.n_action_steps >= 1, "policy.n_action_steps", "must be >= 1")
        _require(self.kind == "pi0" or self.n_action_steps <= self.horizon, "policy.n_action_steps",
                 f"must be <= horizon={self.horizon}")
        _require(self.kind == "pi0" or (self.checkpoint is None and self.pi0 is None), "policy.kind",
                 "policy.checkpoint and policy.pi0 belong to pi0; set policy.kind: pi0 or remove them")
        _require(self.action_pad >= 0, "policy.action_pad", "must be >= 0 (0 = no padding)")
        _require(self.width >= 8 and self.heads >= 1 and self.width % self.heads == 0, "policy.heads",
                 f"width={self.width} must be divisible by heads={self.heads}")
        _require(self.depth >= 1, "policy.depth", "must be >= 1")
        _require(0.0 <= self.dropout < 1.0, "policy.dropout", "must be in [0, 1)")
        _require(self.num_steps >= 1, "policy.num_steps", "must be >= 1")


@dataclass(kw_only=True)
class DemoConfig:
    """Motion-planned demonstrations (ManiSkill3's ``mani_skill.examples.motionplanning``)."""

    num_demos: int = 100
    """Successful trajectories to generate (failed plans are discarded)."""
    seed: int = 500_000
    """First seed of the demo episodes (disjoint from training and evaluation seeds)."""
    path: str = "demos"
    """Folder (relative to the run's ``data_dir``) for the demo files."""

    def __post_init__(self) -> None:
        _require(self.num_demos >= 1, "demos.num_demos", "must be >= 1")


@dataclass(kw_only=True)
class SFTConfig:
    """Few-shot supervised flow-matching initialisation (``u = eps - a``)."""

    num_demos: int = 65
    """Demonstrations used for SFT (few enough that the start leaves room for RL)."""
    steps: int = 15_000
    """Gradient steps."""
    batch_size: int = 256
    """Samples per step."""
    lr: float = 3e-4
    """AdamW learning rate (cosine-decayed to 10 %)."""
    weight_decay: float = 1e-4
    """AdamW weight decay."""
    seed: int = 0
    """Seed of initialisation and batching."""

    def __post_init__(self) -> None:
        _require(self.num_demos >= 1, "sft.num_demos", "must be >= 1")
        _require(self.steps >= 1, "sft.steps", "must be >= 1")
        _require(self.batch_size >= 1, "sft.batch_size", "must be >= 1")
        _require(self.lr > 0, "sft.lr", "must be > 0")


@dataclass(kw_only=True)
class NFTConfig:
    """π-StepNFT objective and rollout sampling (SPEC S2, S5-S8)."""

    noise_level: float = 0.2
    """Flow-SDE noise level a (S2); the only source of exploration."""
    beta: float = 1.0
    """Trust region: half-width of the mirrored branches (S5)."""
    gamma: float = 1.0
    """Logistic temperature ("dpo beta") of the ranking loss (S7)."""
    max_drift: float | None = 0.5
    """Per-token L2 clip of ``v_theta - v_old`` over D (S5); null disables it."""
    kl_coef: float = 1e-4
    """Weight of the velocity-drift penalty (S7)."""
    loss: Literal["ranking", "wmse"] = "ranking"
    """``ranking`` (S7, default) or ``wmse`` (DiffusionNFT-style, S8)."""
    target: Literal["next", "x0"] = "next"
    """Supervise the next solver state (default) or the terminal sample (S8)."""
    branches: Literal["both", "positive", "negative"] = "both"
    """Both mirrored branches, or a single-branch ablation (S8)."""
    rollout: Literal["sde", "ode"] = "sde"
    """``sde``: Flow-SDE rollouts; ``ode``: noise off during rollouts (the paper's ODE baseline, S8)."""
    step: str = "random"
    """Supervised solver index: ``random`` (U{0..K-1} per sample, S3) or ``fixed:j``."""
    steps_per_call: int = 1
    """Solver transitions stored per policy call (1 = the paper; up to K records several distinct steps)."""
    score: Literal["success", "dense"] = "success"
    """Episode outcome behind the labels (S4): ``success`` (0/1, the paper) or ``dense``, a soft score in [0, 1]
    from the env's per-step reward in [0, 1] (ManiSkill ``normalized_dense``), with the steps after a success
    counted at reward 1 (``fastnft.loop.rollout.dense_episode_score``). Dense grades failures by how far they got."""
    baseline: Literal["none", "batch", "group"] = "none"
    """Label baseline (S4 soft score): ``none`` y = 2s - 1 (the paper); ``batch`` y = s - mean(s) over the
    iteration; ``group`` y = s - mean of the ``train.group_size`` rollouts from the same initial state."""

    def __post_init__(self) -> None:
        _require(self.noise_level >= 0, "nft.noise_level", "must be >= 0")
        _require(self.beta > 0, "nft.beta", "must be > 0")
        _require(self.gamma > 0, "nft.gamma", "must be > 0")
        _require(self.max_drift is None or self.max_drift > 0, "nft.max_drift", "must be > 0 or null (no clip)")
        _require(self.kl_coef >= 0, "nft.kl_coef", "must be >= 0")
        _require(self.steps_per_call >= 1, "nft.steps_per_call", "must be >= 1")
        _require(self.step == "random" or (self.step.startswith("fixed:") and self.step[6:].isdigit()), "nft.step",
                 f"must be 'random' or 'fixed:j' with j an integer solver index, got {self.step!r}")

    def fixed_step(self) -> int | None:
        """The fixed solver index of ``step = fixed:j``, or None for ``random``."""
        return int(self.step[6:]) if self.step.startswith("fixed:") else None


@dataclass(kw_only=True)
class GRPOConfig:
    """Flow-GRPO reference algorithm (``algo: grpo``; Flow-GRPO, Liu et al. 2025; pi_RL, arXiv 2510.25889).

    Group-relative advantages and the PPO-clipped likelihood ratio of each recorded Flow-SDE step, no critic
    (``fastnft/nft.py`` module docstring, G1-G4). Ignored with ``algo: stepnft``.
    """

    clip_eps: float = 0.2
    """PPO clip half-width: the ratio is clipped to [1 - clip_eps, 1 + clip_eps] (Flow-GRPO and PPO use 0.2)."""
    adv_eps: float = 1e-4
    """Added to the group's std in ``A = (s - mean_G) / (std_G + adv_eps)``; keeps near-unanimous groups finite."""
    kl_coef: float = 0.0
    """Weight of S7's velocity-drift penalty ``mean_D (v_theta - v_old)^2``. Default 0: the PPO clip is GRPO's
    trust region, and v_old is the EMA rollout policy, not Flow-GRPO's frozen reference model, so the term would
    be a different regulariser from the paper's KL; set it (e.g. nft.kl_coef's 1e-4) for a like-for-like run."""
    log_ratio_clamp: float | None = 20.0
    """Clamp of the per-row log-ratio before exp (float32 overflow guard, as in common PPO code); far outside the
    clip range, it only silences rows with a negative advantage and ratio > e^20. null disables it."""

    def __post_init__(self) -> None:
        _require(0.0 < self.clip_eps < 1.0, "grpo.clip_eps", f"must be in (0, 1) (default 0.2), got {self.clip_eps}")
        _require(self.adv_eps > 0, "grpo.adv_eps", f"must be > 0 (default 1e-4), got {self.adv_eps}")
        _require(self.kl_coef >= 0, "grpo.kl_coef", f"must be >= 0 (0 = no drift penalty), got {self.kl_coef}")
        _require(self.log_ratio_clamp is None or self.log_ratio_clamp > 0, "grpo.log_ratio_clamp",
                 f"must be > 0 or null (no clamp), got {self.log_ratio_clamp}")


@dataclass(kw_only=True)
class EngineConfig:
    """DeepSpeed ZeRO actor engine and kernel dispatch."""

    zero_stage: int = 0
    """ZeRO stage 0-3 for the action expert (optimizer state / gradients / parameters sharded across ranks)."""
    kernels: Literal["auto", "triton", "torch"] = "auto"
    """``auto``: fused Triton kernels where supported and faster (CUDA), else the PyTorch reference."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Compute precision of the policy: ``bfloat16`` runs its forward under torch autocast (CPU and CUDA) while
    the optimizer, EMA and checkpoints keep fp32 master weights; the loss is always fp32 (SPEC S6)."""

    def __post_init__(self) -> None:
        _require(self.zero_stage in (0, 1, 2, 3), "engine.zero_stage", f"must be 0, 1, 2 or 3, got {self.zero_stage}")


@dataclass(kw_only=True)
class RolloutConfig:
    """How rollouts execute on the device (the results do not depend on it)."""

    cuda_graphs: Literal["auto", "on", "off"] = "auto"
    """Capture the K-step sampler in a CUDA graph per shape: ``auto`` = on for CUDA, eager elsewhere; ``on`` needs
    CUDA; ``off`` always eager."""


@dataclass(kw_only=True)
class TrainConfig:
    """Online StepNFT loop (SPEC S3, S4, S9; optimiser as the paper, Appendix C.2)."""

    iterations: int = 100
    """Training iterations T (rollout, update epochs, EMA)."""
    episodes_per_iter: int = 64
    """Episodes collected per iteration (across all envs of this rank)."""
    update_epochs: int = 1
    """Passes over each iteration's buffer."""
    micro_batch: int = 512
    """Samples per gradient step."""
    lr: float = 3e-5
    """AdamW learning rate (constant)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    eps: float = 1e-5
    """AdamW epsilon."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Global gradient-norm clip."""
    ema_start: float = 0.1
    """EMA decay at iteration 0 (S9)."""
    ema_end: float = 0.995
    """EMA decay at the end of the schedule (S9)."""
    ema_horizon: int = 0
    """T of the EMA schedule (S9); 0 = ``iterations``."""
    eval_every: int = 10
    """Evaluate (ODE sampling, held-out seeds) every this many iterations; 0 = only at the end."""
    eval_episodes: int = 200
    """Held-out episodes per evaluation."""
    checkpoint_every: int = 5
    """Write a checkpoint every this many iterations (atomically)."""
    group_size: int = 1
    """Rollouts per initial state (env seed) in an iteration; ``episodes_per_iter`` must be a multiple of it."""
    seed: int = 0
    """Seed of the RL run (rollout noise, step indices, shuffling)."""
    label_control: Literal["none", "shuffled", "zero"] = "none"
    """Label control experiment: ``none`` trains on the real labels; ``shuffled`` permutes the episode
    labels across the iteration's episodes (same label distribution, no relation to the injected noise);
    ``zero`` sets every label to 0, so only the KL term and the EMA machinery move the policy."""
    lr_warmup: int = 0
    """Linear learning-rate warm-up over this many iterations (``lr * min(1, (it + 1) / lr_warmup)``); 0 = off.
    Adam's first steps are close to sign descent, so a warm-up keeps the early noise-dominated steps small."""
    diagnostics: bool = True
    """Per-iteration gradient-signal diagnostics before the update: the cosine between the gradients of two
    random halves of the buffer, and the share of the gradient's squared norm that the labels explain against
    the same buffer with shuffled labels (four extra backward passes on at most 4096 rows), on the iterations
    that ``diagnostics_every`` picks. They draw from their own generator (seeded by ``seed``, rank and iteration),
    so switching them on, off or to another schedule leaves the training itself unchanged."""
    diagnostics_every: int = 60
    """Run the gradient-signal diagnostics (``diagnostics``) on the first and the last iteration and on every
    iteration whose 1-based number is a multiple of this; 1 = every iteration, 0 = first and
    last only. A call costs up to 3.7 s on the embedded default's buffer (3.2 s of CPU on the bandit with
    the same policy and buffer size, ``bench/diagnostics_cost.json``); the default makes 3 calls in the main job's
    120 iterations, under 0.1 s an iteration, under 1 % of a 10 s iteration. Skipped iterations log no ``signal/*``
    keys and no ``time/actor/diagnostics``. ``perf/diagnostics_share`` is the share of each iteration's wall time
    spent in diagnostics: the gradient signal plus the fresh/replayed loss statistics
    (``time/actor/loss_diagnostics``, every iteration, on 256 buffer rows)."""

    def diagnostics_at(self, it: int) -> bool:
        """Whether iteration ``it`` (0-based) runs the gradient-signal diagnostics (``diagnostics`` and
        ``diagnostics_every``)."""
        if not self.diagnostics:
            return False
        done = it + 1
        return it == 0 or done == self.iterations or (self.diagnostics_every > 0 and done % self.diagnostics_every == 0)

    def __post_init__(self) -> None:
        _require(self.iterations >= 1, "train.iterations", "must be >= 1")
        _require(self.lr_warmup >= 0, "train.lr_warmup", "must be >= 0 (0 = no warm-up)")
        _require(self.diagnostics_every >= 0, "train.diagnostics_every",
                 f"must be >= 0 (1 = every iteration, 0 = first and last only), got {self.diagnostics_every}")
        _require(self.episodes_per_iter >= 1, "train.episodes_per_iter", "must be >= 1")
        _require(self.update_epochs >= 1, "train.update_epochs", "must be >= 1")
        _require(self.micro_batch >= 1, "train.micro_batch", "must be >= 1")
        _require(self.lr > 0, "train.lr", "must be > 0")
        _require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "train.betas",
                 "must be two floats in [0, 1)")
        _require(self.grad_clip > 0, "train.grad_clip", "must be > 0")
        _require(0 <= self.ema_start <= 1 and 0 <= self.ema_end <= 1, "train.ema_start",
                 "EMA decays must lie in [0, 1]")
        _require(self.eval_every >= 0 and self.checkpoint_every >= 1, "train.checkpoint_every", "must be >= 1")
        _require(self.eval_episodes >= 1, "train.eval_episodes", "must be >= 1")
        _require(self.group_size >= 1 and self.episodes_per_iter % self.group_size == 0, "train.group_size",
                 f"must be >= 1 and divide train.episodes_per_iter={self.episodes_per_iter}")


@dataclass(kw_only=True)
class ExperimentConfig:
    """One experiment: the embedded default is ``configs/pickcube_stepnft.yaml``."""

    name: str = "pickcube_stepnft"
    """Experiment name (used in the run directory)."""
    run_dir: str = "runs/pickcube_stepnft"
    """Output folder: resolved config, metrics (JSONL + TensorBoard), checkpoints, report, plot."""
    data_dir: str = "data"
    """Folder for demonstrations and the SFT checkpoint shared between runs."""
    device: str = "auto"
    """``auto`` (cuda if available), ``cpu`` or ``cuda``."""
    algo: Literal["stepnft", "grpo"] = "stepnft"
    """Training objective on the same rollouts, engine and EMA: ``stepnft`` (SPEC S4-S8, default) or ``grpo`` (the
    Flow-GRPO reference: group-relative advantages, PPO-clipped SDE-step likelihood ratio, section ``grpo``).
    ``grpo`` needs ``train.group_size > 1`` and SDE rollouts with ``nft.noise_level > 0``; it uses ``nft``'s
    sampling keys (noise_level, rollout, step, steps_per_call) and ignores the StepNFT-only ones (beta, gamma,
    max_drift, kl_coef, loss, branches, baseline)."""
    env: EnvConfig = field(default_factory=EnvConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    demos: DemoConfig = field(default_factory=DemoConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    nft: NFTConfig = field(default_factory=NFTConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """How rollouts execute on the device (CUDA graphs); see :class:`RolloutConfig`."""
    train: TrainConfig = field(default_factory=TrainConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    """Flow-GRPO settings (used only with ``algo: grpo``)."""

    def __post_init__(self) -> None:
        _require(self.device in ("auto", "cpu", "cuda"), "device", "must be 'auto', 'cpu' or 'cuda'")
        fs = self.nft.fixed_step()
        _require(fs is None or fs < self.policy.num_steps, "nft.step",
                 f"fixed solver index must be < policy.num_steps={self.policy.num_steps}")
        _require(self.nft.steps_per_call <= self.policy.num_steps, "nft.steps_per_call",
                 f"must be <= policy.num_steps={self.policy.num_steps}")
        _require(self.nft.baseline != "group" or self.train.group_size > 1, "nft.baseline",
                 "'group' needs train.group_size > 1 (several rollouts per initial state)")
        grouped = self.nft.baseline == "group" or self.algo == "grpo"
        _require(not (grouped and self.env.sim_backend == "gpu" and self.env.task != "bandit"), "env.sim_backend",
                 "gpu with nft.baseline: group / algo: grpo is refused until measured on a GPU: equal seeds must give "
                 "equal initial states, and mani_skill 3.0.1's batched GPU reset seeds every env from the first "
                 "seed (fastnft resets env by env to fix it; fastnft doctor's maniskill_gpu_seeding row checks it). "
                 "Fix: env.sim_backend: cpu, or nft.baseline: batch / none with algo: stepnft")
        rgb = self.env.obs_mode == "rgb"
        _require(rgb == (self.policy.kind == "pi0"), "env.obs_mode",
                 f"policy.kind {self.policy.kind!r} reads {'camera frames' if self.policy.kind == 'pi0' else 'states'}"
                 f" but env.obs_mode is {self.env.obs_mode!r}; use obs_mode rgb with kind pi0, state with state_flow")
        if self.algo == "grpo":
            _require(self.train.group_size > 1, "train.group_size",
                     f"algo 'grpo' needs train.group_size > 1 (advantages are relative to the rollouts of one "
                     f"initial state), got {self.train.group_size}; set e.g. train.group_size=8")
            degenerate = "with std = 0 the SDE-step likelihood is a point mass and the ratio is undefined"
            _require(self.nft.rollout == "sde", "nft.rollout",
                     f"algo 'grpo' needs stochastic rollouts, set nft.rollout: sde ({degenerate})")
            _require(self.nft.noise_level > 0, "nft.noise_level",
                     f"algo 'grpo' needs nft.noise_level > 0, e.g. 0.2 ({degenerate})")
            _require(self.nft.target == "next", "nft.target",
                     "algo 'grpo' scores the recorded solver transition x_t -> x_next; set nft.target: next")


# ----------------------------------------------------------------------------------------------------------------
# dict <-> dataclass with strict checking

def _type_ok(value: Any, tp: Any) -> tuple[bool, Any]:
    """Check/coerce ``value`` against annotation ``tp``. Returns (ok, coerced value)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return True, value
    if origin is Literal:
        args = typing.get_args(tp)
        if isinstance(value, bool) and {"on", "off"} <= set(args):  # YAML 1.1 reads on/off as booleans
            value = "on" if value else "off"
        return value in args, value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if arg is type(None) and value is None:
                return True, None
            if arg is not type(None):
                ok, v = _type_ok(value, arg)
                if ok:
                    return True, v
        return False, value
    if tp is dict or origin is dict:  # free-form blocks validated by their owner (policy.pi0 -> Pi0Config)
        return isinstance(value, dict), value
    if origin is list:
        (arg,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            return False, value
        out_list = []
        for v in value:
            ok, cv = _type_ok(v, arg)
            if not ok:
                return False, value
            out_list.append(cv)
        return True, out_list
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            return False, value
        out = []
        for v, a in zip(value, args):
            ok, cv = _type_ok(v, a)
            if not ok:
                return False, value
            out.append(cv)
        return True, tuple(out)
    if tp is float:
        if isinstance(value, bool):
            return False, value
        if isinstance(value, (int, float)):
            return True, float(value)
        if isinstance(value, str):  # PyYAML (YAML 1.1) reads 1e-4 as a string; accept any float literal
            try:
                return True, float(value)
            except ValueError:
                return False, value
        return False, value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is str:
        return isinstance(value, str), value
    return isinstance(value, tp), value


def config_from_dict(cls: type, data: dict[str, Any] | None, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a nested dict, rejecting unknown keys and wrong types.

    Raises:
        ConfigError: unknown key (with the closest valid name), wrong type, or a value ``__post_init__`` rejects.
    """
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix or '<root>'}' must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if full in _RENAMED:
            raise ConfigError(f"config key '{full}' was renamed to {_RENAMED[full]}; rename it in the YAML or the "
                              "override")
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {', '.join(fields)}"
            raise ConfigError(f"unknown config key '{full}'{hint}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = config_from_dict(tp, value, prefix=f"{full}.")
            continue
        ok, coerced = _type_ok(value, tp)
        if not ok:
            raise ConfigError(f"config key '{full}': expected {_type_name(tp)}, got {value!r} "
                              f"({type(value).__name__}); fix the value in the YAML or the override")
        kwargs[key] = coerced
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:  # pragma: no cover - defensive
        raise ConfigError(f"config section '{prefix or '<root>'}': {e}") from e


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of a config (tuples as lists), suitable for YAML/JSON."""
    def conv(x: Any) -> Any:
        if dataclasses.is_dataclass(x):
            return {f.name: conv(getattr(x, f.name)) for f in dataclasses.fields(x)}
        if isinstance(x, tuple):
            return [conv(v) for v in x]
        return x
    return conv(cfg)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides (value parsed as YAML) to a nested dict, in place.

    Raises:
        ConfigError: an override without ``=``.
    """
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value (e.g. train.iterations=10)")
        key, raw = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: '{p}' is not a config section")
        node[parts[-1]] = yaml.safe_load(raw)
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Load an :class:`ExperimentConfig` from YAML (None = built-in defaults) plus ``key=value`` overrides.

    Raises:
        ConfigError: file missing, not a YAML mapping, or any invalid key/value.
    """
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist; pass one of configs/*.yaml")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping at the top level")
    apply_overrides(data, overrides or [])
    return config_from_dict(ExperimentConfig, data)
