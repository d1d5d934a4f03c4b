"""ManiSkill3 adapter for the batched :class:`~fastnft.envs.base.VectorEnv` API.

Two backends behind one class, :class:`ManiSkillVectorEnv`:

* **cpu** (tested): ManiSkill's CPU physics refuses ``num_envs > 1``, so N single-env copies run in a
  :class:`~fastnft.envs.pool.WorkerPool`: one worker process per core (``env.num_workers``), each stepping its
  share of the copies in turn, a whole action chunk per round trip, each copy stopped at its episode's end;
  observations come back through shared memory. A slot whose episode ended is not stepped; the rollout starts
  the next episode in it (``reset_slots``). A worker that dies is replaced (its episodes are reported lost).
  Starting a worker costs a few seconds (imports + scene), so build the env once and reuse it.
* **gpu** (never run: no GPU has been available to this project): ManiSkill's native batched PhysX-GPU scene,
  ``gym.make(task, num_envs=N, sim_backend="physx_cuda:<LOCAL_RANK>")``, co-located with the policy in one
  process. Observations, actions, rewards and success flags stay CUDA tensors end to end (``env.device`` is
  the scene's device) and the base class adds no host sync per env step. The host syncs per env step that
  remain are ManiSkill's/SAPIEN's own: the PhysX-GPU ``scene.step()`` and its ``gpu_apply_*`` / ``gpu_fetch_*``
  transfers between PhysX's buffers and torch block the host until PhysX's CUDA work is done (and
  ``torch.cuda.synchronize()`` in ManiSkill's sensor path, which state observations do not take). A reset
  seeds each env's numpy RNG on the host (per reset, not per step), and resets the envs one at a time so that
  equal seeds give equal initial states (:meth:`ManiSkillVectorEnv._gpu_reset`); until that is measured on a
  GPU, grouped baselines and GRPO are refused on this backend (the config, :func:`check_grouped_seeding`).

SAPIEN needs a Vulkan device even for state observations; on a CPU-only machine that is Mesa lavapipe >= 24.3
(installed by ``bash scripts/install.sh``). :func:`make_single_env` builds exactly the env one CPU worker runs,
so demonstrations recorded with it (:mod:`fastnft.experiments.demos`) see the same observations as the vector env.

Two observation modes (``EnvConfig.obs_mode``):

* **state**: ``[N, obs_dim]`` float32, ManiSkill's flattened ground-truth state (42 for PickCube-v1).
* **rgb** (camera observations for pi0-style policies): a dict with lerobot's keys,

  - ``observation.images.<camera>``: ``[N, H, W, 3]`` uint8 for each name in ``EnvConfig.cameras``, in order;
  - ``observation.state``: ``[N, state_dim]`` float32, ManiSkill's rgb-mode ``agent`` entries (the robot's
    proprioception: ``qpos``, ``qvel``) followed by its ``extra`` entries (the task's additions), each flattened
    in ManiSkill's own dict order with ManiSkill's ``flatten_state_dict``, i.e. the layout of ManiSkill's state
    mode without the entries that only state mode adds. PickCube-v1 (29): ``qpos`` 0:9, ``qvel`` 9:18,
    ``is_grasped`` 18, ``tcp_pose`` 19:26, ``goal_pos`` 26:29, equal to the first 29 entries of its state
    observation. The goal is hidden from the cameras, so ``goal_pos`` is the only place it appears. The cameras'
    ``sensor_param`` (intrinsics, poses) are not included;
  - ``task``: N copies of the language instruction (``EnvConfig.instruction`` or the task's built-in one).

  The CPU workers render with SAPIEN's CPU renderer (lavapipe), or with the GPU renderer where CUDA is present,
  and write the frames to the pool's shared memory (``state`` and one uint8 array per camera); the instruction is
  added in this process. The GPU backend renders in the PhysX-GPU scene on
  the same GPU and returns the frames as CUDA tensors.

    env = ManiSkillVectorEnv(EnvConfig(sim_backend="cpu"), num_envs=4)
    obs = env.reset([0, 1, 2, 3])          # [4, 42] float32 for PickCube-v1 / state / pd_ee_delta_pos
    res = env.step(torch.zeros(4, env.act_dim))
    env.close()

    env = ManiSkillVectorEnv(EnvConfig(obs_mode="rgb", image_size=64), num_envs=2)
    obs = env.reset([0, 1])  # {"observation.images.base_camera": [2, 64, 64, 3] uint8,
                             #  "observation.state": [2, 29] float32, "task": [2 strings]}
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from fastnft.envs.base import STATE_KEY, TASK_KEY, EnvObs, image_key
from fastnft.envs.pool import PooledEnv, WorkerPool, default_workers

if TYPE_CHECKING:
    import gymnasium as gym
    from typing_extensions import Self  # typing.Self needs 3.11; requires-python is 3.10

    from fastnft.config import EnvConfig

__all__ = ["VULKAN_FIX", "ManiSkillSim", "ManiSkillVectorEnv", "check_grouped_seeding", "check_task",
           "make_single_env", "resolve_backend", "vulkan_available"]

VULKAN_FIX = ("SAPIEN (ManiSkill's simulator) found no Vulkan device. Fix: run `bash scripts/install.sh` (it "
              "installs Mesa lavapipe >= 24.3 from bookworm-backports, the CPU Vulkan driver), or set up a GPU "
              "driver with Vulkan support (check with `vulkaninfo --summary`)")
_VULKAN_MARKERS = ("vulkan", "vk::", "rendering device", "incompatibledriver", "render device", "svulkan")


def _import_mani_skill() -> None:
    try:
        import mani_skill.envs  # noqa: F401  (registers the env ids)
    except ImportError as e:  # pragma: no cover - install problem
        raise RuntimeError(f"cannot import ManiSkill3 ({e}); fix: run `bash scripts/install.sh`") from e


def vulkan_available() -> tuple[bool, str]:
    """Whether ManiSkill3 imports and SAPIEN finds a Vulkan device (cheap: ~0.2 s, in this process).

    Returns:
        ``(True, "")`` or ``(False, reason)`` with the reason and the fix (for test skips and diagnostics).
    """
    try:
        import mani_skill.envs  # noqa: F401
        import sapien
    except ImportError as e:
        return False, f"ManiSkill3/SAPIEN not importable ({e}); fix: run `bash scripts/install.sh`"
    try:
        sapien.render.RenderSystem()
    except RuntimeError as e:
        return False, f"{VULKAN_FIX}. (SAPIEN said: {e})"
    return True, ""


def check_task(task: str) -> None:
    """Check that ``task`` is a registered ManiSkill3 env id whose assets are present locally.

    Raises:
        ValueError: unknown env id (the message lists a few valid ones).
        RuntimeError: the env needs assets that are not downloaded (the message gives the download command);
            ManiSkill would otherwise prompt on stdin and exit inside a worker process.
    """
    _import_mani_skill()
    from mani_skill.utils import assets
    from mani_skill.utils.registration import REGISTERED_ENVS

    if task not in REGISTERED_ENVS:
        import difflib

        close = difflib.get_close_matches(task, list(REGISTERED_ENVS), n=3, cutoff=0.5)
        common_ids = [t for t in ("PickCube-v1", "PushCube-v1", "StackCube-v1", "PegInsertionSide-v1",
                                  "PullCube-v1", "LiftPegUpright-v1") if t in REGISTERED_ENVS]
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ValueError(f"unknown ManiSkill3 task {task!r}: {hint}valid ids include {', '.join(common_ids)} "
                         f"({len(REGISTERED_ENVS)} registered; list them with "
                         "`python -c \"import mani_skill.envs; from mani_skill.utils.registration import "
                         "REGISTERED_ENVS; print(sorted(REGISTERED_ENVS))\"`), or 'bandit'")
    missing = []
    for asset_id in REGISTERED_ENVS[task].asset_download_ids or []:
        ids = (assets.expand_data_group_into_individual_data_source_ids(asset_id)
               if asset_id in assets.DATA_GROUPS else [asset_id])
        missing += [i for i in ids if not assets.is_data_source_downloaded(i)]
    if missing:
        shown = ", ".join(missing[:5]) + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else "")
        raise RuntimeError(f"ManiSkill task {task!r} needs assets that are not downloaded: {shown}. Fix: "
                           f"`python -m mani_skill.utils.download_asset {task} -y` (needs internet) before training")


def resolve_backend(cfg: EnvConfig) -> str:
    """``'cpu'`` or ``'gpu'`` for ``cfg.sim_backend`` (``auto`` = gpu if CUDA is available).

    Raises:
        RuntimeError: ``gpu`` requested but CUDA is unavailable.
    """
    if cfg.sim_backend == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    if cfg.sim_backend == "gpu" and not torch.cuda.is_available():
        raise RuntimeError("env.sim_backend=gpu needs a CUDA device; none found. Fix: set env.sim_backend=cpu "
                           "(or auto)")
    return cfg.sim_backend


def check_grouped_seeding(backend: str, grouped: bool) -> None:
    """Refuse grouped rollouts (the group baseline, GRPO) on the GPU backend until its seeding is measured.

    Both subtract means over the ``train.group_size`` rollouts of one initial state, which holds only if equal
    seeds give equal initial states (:meth:`ManiSkillVectorEnv._gpu_reset`). ``env.sim_backend: gpu`` is refused by
    the config; this catches ``auto`` resolved to gpu.

    Raises:
        ValueError: ``backend == "gpu"`` and ``grouped``.
    """
    if backend == "gpu" and grouped:
        raise ValueError("nft.baseline: group / algo: grpo on the ManiSkill GPU backend (env.sim_backend auto resolved "
                         "to gpu) is refused until measured on a GPU: the group means assume that equal seeds give "
                         "equal initial states, which mani_skill 3.0.1's batched GPU reset breaks (it seeds every env "
                         "from the first seed); fastnft resets env by env to fix it, not yet run on a GPU (fastnft "
                         "doctor's maniskill_gpu_seeding row checks it). Fix: env.sim_backend: cpu, or "
                         "nft.baseline: batch / none with algo: stepnft")


def _translate_sim_error(e: BaseException) -> BaseException:
    """Map SAPIEN's low-level Vulkan failures to a RuntimeError with the fix; other errors pass through."""
    msg = str(e).lower()
    if isinstance(e, RuntimeError) and any(m in msg for m in _VULKAN_MARKERS):
        return RuntimeError(f"{VULKAN_FIX}. (SAPIEN said: {e})")
    return e


def _make_kwargs(task: str, control_mode: str, obs_mode: str, max_episode_steps: int,
                 render_backend: str = "none", image_size: int | None = None) -> dict[str, Any]:
    kw: dict[str, Any] = {"obs_mode": obs_mode, "control_mode": control_mode, "max_episode_steps": max_episode_steps,
                          "render_mode": None, "render_backend": render_backend if obs_mode != "state" else "none"}
    if obs_mode != "state" and image_size is not None:
        kw["sensor_configs"] = {"width": int(image_size), "height": int(image_size)}
    return kw


def _cpu_render_backend() -> str:
    """SAPIEN renderer of the CPU-physics workers: the GPU's where CUDA is present, else the CPU's (lavapipe)."""
    return "sapien_cuda" if torch.cuda.is_available() else "sapien_cpu"


def _state_dim(space: Any) -> int:
    """Width of ``flatten_state_dict`` of the ``agent`` and ``extra`` entries of a ManiSkill (single-env)
    observation space (a scalar such as ``is_grasped`` counts 1)."""
    from gymnasium import spaces

    def size(sp: Any) -> int:
        if isinstance(sp, spaces.Dict):
            return sum(size(v) for v in sp.values())
        return max(1, int(np.prod(sp.shape)))

    return sum(size(space[k]) for k in ("agent", "extra") if k in space.spaces)


def _check_cameras(base: Any, cameras: list[str] | tuple[str, ...]) -> dict[str, tuple[int, int, int]]:
    """``{camera: (H, W, 3)}`` of the requested RGB cameras of ManiSkill env ``base`` (rgb obs mode).

    Raises:
        ConfigError: a camera the task does not have (the message names env.cameras and lists the ones it has).
    """
    from fastnft.config import ConfigError

    sensors = base.single_observation_space["sensor_data"]
    have = [k for k in sensors.spaces if "rgb" in sensors[k].spaces]
    missing = [c for c in cameras if c not in have]
    if missing:
        spec = getattr(base, "spec", None)
        raise ConfigError(f"config key 'env.cameras': {spec.id if spec else 'the task'} has no camera "
                          f"{', '.join(map(repr, missing))}; its cameras are {', '.join(have) or 'none'}")
    return {c: tuple(int(x) for x in sensors[c]["rgb"].shape) for c in cameras}  # type: ignore[misc]


def _rgb_state(obs: dict[str, Any], device: Any = None) -> Tensor:
    """``[B, state_dim]`` float32: ``agent`` then ``extra`` of a ManiSkill rgb-mode observation, flattened."""
    from mani_skill.utils.common import flatten_state_dict

    parts = {k: obs[k] for k in ("agent", "extra") if k in obs}
    return flatten_state_dict(parts, use_torch=True, device=device).float()


def _reset_obs(base: Any) -> Any:
    """Observation right after ``base.reset()``, with the stale ``is_grasped`` flag fixed.

    PhysX reports contacts of the last simulated step, and a reset teleports bodies without stepping, so after an
    episode that ended holding the object ManiSkill's first observation still says ``is_grasped = 1`` (a fresh env
    says 0). Nothing is grasped at a reset (objects are spawned free, the gripper open), so the flag is set to 0
    and the observation recomputed; from the first step on, contacts are fresh.
    """
    info = base.get_info()
    if "is_grasped" not in info:
        return base.get_obs(info)
    info["is_grasped"] = torch.zeros_like(torch.as_tensor(info["is_grasped"]))
    return base.get_obs(info)


def _single_env_class() -> type:
    import gymnasium as gym

    class SingleManiSkillEnv(gym.Wrapper):
        """One CPU ManiSkill env with an unbatched numpy API: obs ``[obs_dim]`` float32 (state mode) or
        ``{"state": [state_dim] float32, <camera>: [H, W, 3] uint8, ...}`` (rgb mode, ``cameras`` given), reward
        float, ``terminated``/``truncated`` always False (the VectorEnv base class owns episode ends), info
        ``{"success": bool}``."""

        def __init__(self, env: gym.Env, cameras: list[str] | tuple[str, ...] | None = None) -> None:
            super().__init__(env)
            base = env.unwrapped
            self.cameras = tuple(cameras) if cameras is not None else None
            if self.cameras is None:
                self.observation_space = base.single_observation_space
            else:
                shapes = _check_cameras(base, self.cameras)
                self.observation_space = gym.spaces.Dict(
                    {"state": gym.spaces.Box(-np.inf, np.inf, (_state_dim(base.single_observation_space),),
                                             np.float32),
                     **{c: gym.spaces.Box(0, 255, shapes[c], np.uint8) for c in self.cameras}})
            self.action_space = base.single_action_space

        def _obs(self, obs: Any) -> Any:
            if self.cameras is not None:
                out = {"state": _rgb_state(obs).reshape(-1).numpy()}
                for c in self.cameras:
                    out[c] = torch.as_tensor(obs["sensor_data"][c]["rgb"][0]).cpu().numpy().astype(np.uint8, copy=False)
                return out
            if isinstance(obs, dict):
                from mani_skill.utils.common import flatten_state_dict

                obs = flatten_state_dict(obs, use_torch=True)
            return np.asarray(obs.cpu().numpy() if isinstance(obs, Tensor) else obs, dtype=np.float32).reshape(-1)

        def reset(self, *, seed: int | None = None, options: dict | None = None):
            self.env.reset(seed=seed, options=options)
            return self._obs(_reset_obs(self.env.unwrapped)), {}

        def step(self, action):
            action = np.asarray(action, dtype=np.float32).reshape(1, -1)
            obs, reward, _, _, info = self.env.step(action)
            success = bool(info["success"].reshape(-1)[0]) if "success" in info else False
            return self._obs(obs), float(torch.as_tensor(reward).reshape(-1)[0]), False, False, {"success": success}

    return SingleManiSkillEnv


def make_single_env(task: str = "PickCube-v1", control_mode: str = "pd_ee_delta_pos", obs_mode: str = "state",
                    max_episode_steps: int = 100, *, cameras: list[str] | tuple[str, ...] = ("base_camera",),
                    image_size: int | None = None, render_backend: str | None = None) -> gym.Env:
    """Build the single CPU ManiSkill env that each worker of :class:`ManiSkillVectorEnv` runs.

    API: ``reset(seed=s) -> (obs, {})`` and ``step(action) -> (obs, reward, False, False, {"success": bool})`` with
    ``obs: [obs_dim] float32`` (flattened state), ``action: [act_dim]`` in the control mode's units (normalised to
    the action space bounds, ``[-1, 1]`` for the Panda's ``pd_ee_delta_pos``). It never terminates or truncates by
    itself. ``env.unwrapped`` is ManiSkill's ``BaseEnv`` (controllers, scene) for tools such as demo conversion.
    Uses one torch thread (several run side by side).

    With ``obs_mode="rgb"`` the obs is ``{"state": [state_dim] float32, <camera>: [H, W, 3] uint8}`` for each of
    ``cameras`` (rendered at ``image_size`` if given, with ``render_backend``, default :func:`_cpu_render_backend`);
    the other arguments are then used; they are ignored in state mode.

    Raises:
        ValueError: unknown task id, or an obs mode other than ``state`` / ``rgb``.
        ConfigError: a camera the task lacks (names ``env.cameras``).
        RuntimeError: no Vulkan device (message says how to install one) or missing assets.
    """
    import gymnasium as gym

    if obs_mode not in ("state", "rgb"):
        raise ValueError(f"obs_mode must be 'state' or 'rgb', got {obs_mode!r}")
    check_task(task)
    torch.set_num_threads(1)
    rb = (render_backend or _cpu_render_backend()) if obs_mode == "rgb" else "none"
    try:
        env = gym.make(task, sim_backend="physx_cpu", num_envs=1,
                       **_make_kwargs(task, control_mode, obs_mode, max_episode_steps, rb, image_size))
    except Exception as e:
        raise _translate_sim_error(e) from e
    try:
        return _single_env_class()(env, cameras=tuple(cameras) if obs_mode == "rgb" else None)
    except Exception:
        env.close()
        raise


class ManiSkillSim:
    """One CPU ManiSkill env copy with the numpy API of a pool worker's simulator (:mod:`fastnft.envs.pool_worker`):
    ``reset(seed) -> obs``, ``step(action) -> (obs, reward, success)``, obs ``{"state": [obs_dim] float32}`` (state
    mode) or ``{"state": [state_dim] float32, <camera>: [H, W, 3] uint8, ...}`` (rgb). Built with
    :func:`make_single_env` from the same arguments."""

    _spare: tuple[tuple, Any] | None = None  # the env describe() built, handed to the first copy of the same kind

    def __init__(self, **kwargs: Any) -> None:
        key = tuple(sorted((k, repr(v)) for k, v in kwargs.items()))
        spare, ManiSkillSim._spare = ManiSkillSim._spare, None
        self.env = spare[1] if spare is not None and spare[0] == key else make_single_env(**kwargs)
        self.rgb = kwargs.get("obs_mode", "state") == "rgb"

    @classmethod
    def describe(cls, **kwargs: Any) -> dict[str, Any]:
        """Observation layout ``{key: (shape, dtype)}``, ``act_dim`` and action bounds of the env ``kwargs`` build."""
        env = make_single_env(**kwargs)
        cls._spare = (tuple(sorted((k, repr(v)) for k, v in kwargs.items())), env)
        space, act = env.observation_space, env.action_space
        if kwargs.get("obs_mode", "state") == "rgb":
            layout = {k: (tuple(space[k].shape), np.dtype(space[k].dtype).str) for k in space.spaces}
        else:
            layout = {"state": ((int(np.prod(space.shape)),), "<f4")}
        return {"layout": layout, "act_dim": int(np.prod(act.shape)),
                "action_low": np.asarray(act.low, np.float32).reshape(-1),
                "action_high": np.asarray(act.high, np.float32).reshape(-1)}

    def convert(self, raw: Any) -> dict[str, np.ndarray]:
        """ManiSkill's observation -> the numpy dict the pool writes. The worker converts only the observations it
        returns (each chunk's last), not every step's: about a tenth of a CPU step."""
        obs = self.env._obs(raw)
        return obs if self.rgb else {"state": obs}

    def reset(self, seed: int) -> dict[str, np.ndarray]:
        obs = self.env.reset(seed=int(seed))[0]
        return obs if self.rgb else {"state": obs}

    def step(self, action: np.ndarray) -> tuple[Any, float, bool]:
        """One env step; returns ManiSkill's raw observation (:meth:`convert` makes it numpy), reward, success."""
        raw, reward, _, _, info = self.env.env.step(np.asarray(action, dtype=np.float32).reshape(1, -1))
        success = bool(info["success"].reshape(-1)[0]) if "success" in info else False
        return raw, float(torch.as_tensor(reward).reshape(-1)[0]), success

    def close(self) -> None:
        self.env.close()


class ManiSkillVectorEnv(PooledEnv):
    """N ManiSkill3 envs of one task, stepped in lockstep (see the module docstring for the two backends).

    Args:
        cfg: env config; uses ``task``, ``control_mode``, ``obs_mode``, ``max_episode_steps``, ``sim_backend``,
            and for ``obs_mode: rgb`` also ``cameras``, ``image_size``, ``instruction``.
        num_envs: N env slots (parallel episodes).
        num_workers: CPU backend: worker processes, each stepping ``N / num_workers`` single-env copies in turn
            (:class:`~fastnft.envs.pool.WorkerPool`); None = ``cfg.num_workers``, and when that is null one per usable
            core (at most N). Ignored by the GPU backend.

    Attributes:
        obs_dim: flattened state size (42 for PickCube-v1, state obs); with ``rgb`` the width of
            ``observation.state`` (29 for PickCube-v1).
        obs_mode: ``'state'`` or ``'rgb'``.
        cameras: the camera names of ``rgb`` (empty for ``state``).
        image_shapes: ``{camera: (H, W, 3)}`` of ``rgb`` frames (empty for ``state``).
        instruction: the language instruction sent as ``task`` with ``rgb`` (empty for ``state``).
        act_dim: action size (4 for the Panda in ``pd_ee_delta_pos``: xyz end-effector delta + gripper).
        action_low, action_high: ``[act_dim]`` float32 bounds of the action space (``-1`` / ``1`` for Panda
            ``pd_ee_delta_pos``; the controller scales them to +-0.1 m per step).
        backend: ``'cpu'`` or ``'gpu'``.

    Observations are ``[N, obs_dim]`` float32 tensors (``state``) or dicts (``rgb``, see the module docstring) on
    :attr:`device` (CPU, or the GPU scene's device); success is ManiSkill's ``info["success"]``.

    Raises:
        ValueError: unknown task id (lists valid ones) or ``num_envs < 1``.
        ConfigError: a camera the task lacks (names ``env.cameras``).
        RuntimeError: no Vulkan device (says to run ``bash scripts/install.sh``), missing assets, or ``gpu``
            requested without CUDA.
    """

    def __init__(self, cfg: EnvConfig, num_envs: int, num_workers: int | None = None) -> None:
        super().__init__()
        if num_envs < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        check_task(cfg.task)
        self.num_envs = int(num_envs)
        self.max_episode_steps = int(cfg.max_episode_steps)
        self.task = cfg.task
        self.control_mode = cfg.control_mode
        self.obs_mode = cfg.obs_mode
        self.rgb = cfg.obs_mode == "rgb"
        self.cameras: tuple[str, ...] = tuple(cfg.cameras) if self.rgb else ()
        self.image_shapes: dict[str, tuple[int, int, int]] = {}
        self.instruction = cfg.language_instruction() if self.rgb else ""
        self._tasks = [self.instruction] * self.num_envs
        self.backend = resolve_backend(cfg)
        self._gpu_env: Any = None
        self.num_workers = 0
        self._gpu_scene_ready = False  # the GPU scene has had its first (reconfiguring, batched) reset
        if self.backend == "cpu":
            self._init_cpu(cfg, num_workers if num_workers is not None else getattr(cfg, "num_workers", None))
        else:
            self._init_gpu(cfg)

    # -- CPU: a worker pool of single envs ------------------------------------------------------------------------
    def _init_cpu(self, cfg: EnvConfig, num_workers: int | None) -> None:
        self.num_workers = int(num_workers) if num_workers else default_workers(self.num_envs)
        kwargs: dict[str, Any] = {"task": cfg.task, "control_mode": cfg.control_mode, "obs_mode": cfg.obs_mode,
                                  "max_episode_steps": cfg.max_episode_steps}
        if self.rgb:
            kwargs.update(cameras=self.cameras, image_size=cfg.image_size, render_backend=_cpu_render_backend())
        try:
            pool = WorkerPool(("module", __name__, "ManiSkillSim"), kwargs, self.num_envs,
                              min(self.num_workers, self.num_envs), self.max_episode_steps, name="pool")
        except Exception as e:
            raise _translate_sim_error(e) from e
        self._pool = pool
        self._finalizer = weakref.finalize(self, pool.close)
        spec = pool.spec
        if self.rgb:
            self.obs_dim = int(spec["layout"]["state"][0][0])
            self.image_shapes = {c: tuple(spec["layout"][c][0]) for c in self.cameras}  # type: ignore[misc]
        else:
            self.obs_dim = int(spec["layout"]["state"][0][0])
        self.act_dim = int(spec["act_dim"])
        self.action_low = torch.as_tensor(spec["action_low"])
        self.action_high = torch.as_tensor(spec["action_high"])

    # -- GPU: ManiSkill's batched PhysX-GPU scene (untested on the CPU-only dev machine) ------------------------
    def _init_gpu(self, cfg: EnvConfig) -> None:  # pragma: no cover - needs CUDA
        import gymnasium as gym

        from fastnft.devices import local_rank

        rank = local_rank()
        try:  # each rank simulates (and renders) on its own GPU, the one its policy uses
            env = gym.make(cfg.task, num_envs=self.num_envs, sim_backend=f"physx_cuda:{rank}",
                           **_make_kwargs(cfg.task, cfg.control_mode, cfg.obs_mode, cfg.max_episode_steps,
                                          f"sapien_cuda:{rank}", cfg.image_size))
        except Exception as e:
            raise _translate_sim_error(e) from e
        self._gpu_env = env
        self._finalizer = weakref.finalize(self, env.close)
        base = env.unwrapped
        self.device = torch.device(base.device)
        if self.rgb:
            self.image_shapes = _check_cameras(base, self.cameras)
            self.obs_dim = _state_dim(base.single_observation_space)
        else:
            self.obs_dim = int(np.prod(base.single_observation_space.shape))
        self.act_dim = int(np.prod(base.single_action_space.shape))
        self.action_low = torch.as_tensor(np.asarray(base.single_action_space.low, np.float32).reshape(-1))
        self.action_high = torch.as_tensor(np.asarray(base.single_action_space.high, np.float32).reshape(-1))

    def _gpu_obs(self, obs: Any) -> EnvObs:  # pragma: no cover - needs CUDA
        if self.rgb:  # every tensor stays on the scene's device; no host sync added here
            # ManiSkill's default ("minimal") shader returns a view of SAPIEN's CUDA picture buffer, which the next
            # render overwrites: copy it (on the device) so a kept observation stays the frame it was.
            out: dict[str, Any] = {
                image_key(c): obs["sensor_data"][c]["rgb"].clone(memory_format=torch.contiguous_format)
                for c in self.cameras}
            out[STATE_KEY] = _rgb_state(obs, self.device).reshape(self.num_envs, self.obs_dim)
            out[TASK_KEY] = list(self._tasks)
            return out
        if isinstance(obs, dict):
            from mani_skill.utils.common import flatten_state_dict

            obs = flatten_state_dict(obs, use_torch=True)
        return obs.reshape(self.num_envs, -1).float()  # stays on the scene's device

    # -- VectorEnv -------------------------------------------------------------------------------------------
    def _episode(self, slot: int, seed: int) -> dict[str, Any]:
        return {"seed": int(seed)}

    def _pool_obs(self) -> EnvObs:
        """The pool's shared observations -> ``[N, obs_dim]`` float32, or the rgb dict (frames stay uint8); copies."""
        assert self._pool is not None
        arrays = self._pool.arrays
        state = torch.from_numpy(np.array(arrays["state"], dtype=np.float32)).reshape(self.num_envs, self.obs_dim)
        if not self.rgb:
            return state
        out: dict[str, Any] = {image_key(c): torch.from_numpy(np.array(arrays[c], dtype=np.uint8))
                               for c in self.cameras}
        out[STATE_KEY] = state
        out[TASK_KEY] = list(self._tasks)
        return out

    def _gpu_reset(self, slots: list[int], seeds: list[int]) -> None:
        """Reset the given envs of the batched GPU scene, each from its own seed: equal seeds give equal initial states.

        mani_skill 3.0.1 seeds a batched reset with the FIRST seed only (``torch.manual_seed(episode_seed[0])``
        around ``_initialize_episode``), and tasks such as PickCube then draw all envs' initial poses in one
        batched draw: ``reset(seed=[5, 5, 7, 7])`` gives four different states, which breaks the group baseline and
        GRPO (means over rollouts from one initial state). So env j is reset alone, ``reset(seed=[s_j] * N,
        options={"env_idx": [j]})``: its draw has batch 1 and depends on ``s_j`` only. The first reset of a scene
        reconfigures it, which ManiSkill does for all envs at once, so it is one batched reset first. Cost: one
        ManiSkill reset per env (an observation each), per episode start. Not yet run on a GPU (the stub test in
        tests/test_envs_maniskill_seeding.py implements mani_skill's rule; the GPU test is skipped without CUDA).
        """
        env = self._gpu_env
        if not self._gpu_scene_ready:
            env.reset(seed=[int(seeds[0])] * self.num_envs)
            self._gpu_scene_ready = True
        for j, s in zip(slots, seeds, strict=True):
            # s_j in every slot: the torch draw (seeded from slot 0) and, with enhanced determinism, the per-env
            # numpy RNG of slot j both come from s_j
            env.reset(seed=[int(s)] * self.num_envs, options={"env_idx": torch.tensor([j], device=self.device)})

    def _reset_slots(self, slots: list[int], seeds: list[int]) -> EnvObs:
        if self._gpu_env is not None:  # pragma: no cover - needs CUDA
            self._gpu_reset(slots, seeds)
            return self._gpu_obs(_reset_obs(self._gpu_env.unwrapped))
        self._require_open()
        return super()._reset_slots(slots, seeds)

    def _step(self, actions: Tensor) -> tuple[EnvObs, Tensor, Tensor]:  # pragma: no cover - needs CUDA
        obs, reward, _, _, info = self._gpu_env.step(actions)  # the base class put them on self.device
        return (self._gpu_obs(obs), torch.as_tensor(reward, device=self.device).float().reshape(-1),
                torch.as_tensor(info["success"], device=self.device).bool().reshape(-1))

    def _step_chunk(self, actions: Tensor, live: Tensor):
        if self._gpu_env is None:
            self._require_open()
        return super()._step_chunk(actions, live)  # None on the GPU backend: the base class loops _step

    def _require_open(self) -> None:
        if self._pool is None:
            raise RuntimeError("ManiSkillVectorEnv is closed; build a new one")

    def close(self) -> None:
        """Shut the worker processes down (CPU) or release the GPU scene. Idempotent; also runs at garbage
        collection and interpreter exit."""
        fin = getattr(self, "_finalizer", None)
        if fin is not None:
            fin()
        self._pool = None
        self._gpu_env = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        rgb = f", cameras={list(self.cameras)}, image_shapes={self.image_shapes}" if self.rgb else ""
        return (f"ManiSkillVectorEnv(task={self.task!r}, control_mode={self.control_mode!r}, "
                f"num_envs={self.num_envs}, num_workers={self.num_workers}, backend={self.backend!r}, obs_mode={self.obs_mode!r}, "
                f"obs_dim={self.obs_dim}, act_dim={self.act_dim}{rgb})")


def _worker_pids(env: ManiSkillVectorEnv) -> list[int]:
    """PIDs of the CPU worker processes (for tests that check nothing leaks)."""
    return env.worker_pids()
