"""ManiSkill3 adapter for the batched :class:`~fastnft.envs.base.VectorEnv` API.

Two backends behind one class, :class:`ManiSkillVectorEnv`:

* **cpu** (tested): ManiSkill's CPU physics refuses ``num_envs > 1``, so N single-env copies run in spawned
  subprocesses under gymnasium's ``AsyncVectorEnv`` (``fork`` hangs SAPIEN). Autoreset is disabled: an env whose
  episode ended is simply stepped on (the base class ignores its output), it never jumps into a new episode.
  Starting the workers costs a few seconds each (imports + scene), so build the env once and reuse it.
* **gpu** (never run: no GPU has been available to this project): ManiSkill's native batched PhysX-GPU scene,
  ``gym.make(task, num_envs=N, sim_backend="physx_cuda:<LOCAL_RANK>")``, co-located with the policy in one
  process. Observations, actions, rewards and success flags stay CUDA tensors end to end (``env.device`` is
  the scene's device) and the base class adds no host sync per env step. The host syncs per env step that
  remain are ManiSkill's/SAPIEN's own: the PhysX-GPU ``scene.step()`` and its ``gpu_apply_*`` / ``gpu_fetch_*``
  transfers between PhysX's buffers and torch block the host until PhysX's CUDA work is done (and
  ``torch.cuda.synchronize()`` in ManiSkill's sensor path, which state observations do not take). A reset
  seeds each env's numpy RNG on the host (per reset, not per step).

SAPIEN needs a Vulkan device even for state observations; on a CPU-only machine that is Mesa lavapipe >= 24.3
(installed by ``bash scripts/install.sh``). :func:`make_single_env` builds exactly the env one CPU worker runs,
so demonstrations recorded with it (:mod:`fastnft.demos`) see the same observations as the vector env.

    env = ManiSkillVectorEnv(EnvConfig(sim_backend="cpu"), num_envs=4)
    obs = env.reset([0, 1, 2, 3])          # [4, 42] float32 for PickCube-v1 / state / pd_ee_delta_pos
    res = env.step(torch.zeros(4, env.act_dim))
    env.close()
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from fastnft.envs.base import VectorEnv

if TYPE_CHECKING:
    import gymnasium as gym

    from fastnft.config import EnvConfig

__all__ = ["VULKAN_FIX", "ManiSkillVectorEnv", "check_task", "make_single_env", "resolve_backend", "vulkan_available"]

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


def _translate_sim_error(e: BaseException) -> BaseException:
    """Map SAPIEN's low-level Vulkan failures to a RuntimeError with the fix; other errors pass through."""
    msg = str(e).lower()
    if isinstance(e, RuntimeError) and any(m in msg for m in _VULKAN_MARKERS):
        return RuntimeError(f"{VULKAN_FIX}. (SAPIEN said: {e})")
    return e


def _make_kwargs(task: str, control_mode: str, obs_mode: str, max_episode_steps: int) -> dict[str, Any]:
    return dict(obs_mode=obs_mode, control_mode=control_mode, max_episode_steps=max_episode_steps,
                render_mode=None, render_backend="none")


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
        """One CPU ManiSkill env with an unbatched numpy API: obs ``[obs_dim]`` float32, reward float,
        ``terminated``/``truncated`` always False (the VectorEnv base class owns episode ends), info
        ``{"success": bool}``."""

        def __init__(self, env: gym.Env) -> None:
            super().__init__(env)
            base = env.unwrapped
            self.observation_space = base.single_observation_space
            self.action_space = base.single_action_space

        @staticmethod
        def _obs(obs: Any) -> np.ndarray:
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
                    max_episode_steps: int = 100) -> gym.Env:
    """Build the single CPU ManiSkill env that each worker of :class:`ManiSkillVectorEnv` runs.

    API: ``reset(seed=s) -> (obs, {})`` and ``step(action) -> (obs, reward, False, False, {"success": bool})`` with
    ``obs: [obs_dim] float32`` (flattened state), ``action: [act_dim]`` in the control mode's units (normalised to
    the action space bounds, ``[-1, 1]`` for the Panda's ``pd_ee_delta_pos``). It never terminates or truncates by
    itself. ``env.unwrapped`` is ManiSkill's ``BaseEnv`` (controllers, scene) for tools such as demo conversion.
    Uses one torch thread (several run side by side).

    Raises:
        ValueError: unknown task id.
        RuntimeError: no Vulkan device (message says how to install one) or missing assets.
    """
    import gymnasium as gym

    check_task(task)
    torch.set_num_threads(1)
    try:
        env = gym.make(task, sim_backend="physx_cpu", num_envs=1,
                       **_make_kwargs(task, control_mode, obs_mode, max_episode_steps))
    except Exception as e:
        raise _translate_sim_error(e) from e
    return _single_env_class()(env)


class _EnvFn:
    """Picklable factory for AsyncVectorEnv workers (spawned processes re-import this module)."""

    def __init__(self, task: str, control_mode: str, obs_mode: str, max_episode_steps: int) -> None:
        self.args = (task, control_mode, obs_mode, max_episode_steps)

    def __call__(self) -> gym.Env:
        return make_single_env(*self.args)


def _close_async(venv: Any) -> None:
    try:
        venv.close(terminate=True)
    except Exception:  # pragma: no cover - best effort at interpreter exit
        pass


class ManiSkillVectorEnv(VectorEnv):
    """N ManiSkill3 envs of one task, stepped in lockstep (see the module docstring for the two backends).

    Args:
        cfg: env config; uses ``task``, ``control_mode``, ``obs_mode``, ``max_episode_steps``, ``sim_backend``.
        num_envs: N parallel envs (CPU: one subprocess each; keep it near the number of free cores).

    Attributes:
        obs_dim: flattened state size (42 for PickCube-v1, state obs).
        act_dim: action size (4 for the Panda in ``pd_ee_delta_pos``: xyz end-effector delta + gripper).
        action_low, action_high: ``[act_dim]`` float32 bounds of the action space (``-1`` / ``1`` for Panda
            ``pd_ee_delta_pos``; the controller scales them to +-0.1 m per step).
        backend: ``'cpu'`` or ``'gpu'``.

    Observations are ``[N, obs_dim]`` float32 tensors on :attr:`device` (CPU, or the GPU scene's device); success
    is ManiSkill's ``info["success"]``.

    Raises:
        ValueError: unknown task id (lists valid ones) or ``num_envs < 1``.
        RuntimeError: no Vulkan device (says to run ``bash scripts/install.sh``), missing assets, or ``gpu``
            requested without CUDA.
    """

    def __init__(self, cfg: EnvConfig, num_envs: int) -> None:
        super().__init__()
        if num_envs < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        check_task(cfg.task)
        self.num_envs = int(num_envs)
        self.max_episode_steps = int(cfg.max_episode_steps)
        self.task = cfg.task
        self.control_mode = cfg.control_mode
        self.backend = resolve_backend(cfg)
        self._venv: Any = None
        self._gpu_env: Any = None
        if self.backend == "cpu":
            self._init_cpu(cfg)
        else:
            self._init_gpu(cfg)

    # -- CPU: AsyncVectorEnv of single envs -----------------------------------------------------------------------
    def _init_cpu(self, cfg: EnvConfig) -> None:
        from gymnasium.vector import AsyncVectorEnv, AutoresetMode

        fn = _EnvFn(cfg.task, cfg.control_mode, cfg.obs_mode, cfg.max_episode_steps)
        try:
            # gymnasium builds env_fns[0]() once in this process to read the spaces: a Vulkan problem raises here.
            venv = AsyncVectorEnv([fn] * self.num_envs, context="spawn", shared_memory=True, copy=True,
                                  autoreset_mode=AutoresetMode.DISABLED, daemon=True)
        except Exception as e:
            raise _translate_sim_error(e) from e
        self._venv = venv
        self._finalizer = weakref.finalize(self, _close_async, venv)
        obs_space, act_space = venv.single_observation_space, venv.single_action_space
        self.obs_dim = int(np.prod(obs_space.shape))
        self.act_dim = int(np.prod(act_space.shape))
        self.action_low = torch.as_tensor(np.asarray(act_space.low, dtype=np.float32).reshape(-1))
        self.action_high = torch.as_tensor(np.asarray(act_space.high, dtype=np.float32).reshape(-1))

    # -- GPU: ManiSkill's batched PhysX-GPU scene (untested on the CPU-only dev machine) ------------------------
    def _init_gpu(self, cfg: EnvConfig) -> None:  # pragma: no cover - needs CUDA
        import gymnasium as gym

        from fastnft.devices import local_rank

        try:  # each rank simulates on its own GPU, the one its policy uses
            env = gym.make(cfg.task, num_envs=self.num_envs, sim_backend=f"physx_cuda:{local_rank()}",
                           **_make_kwargs(cfg.task, cfg.control_mode, cfg.obs_mode, cfg.max_episode_steps))
        except Exception as e:
            raise _translate_sim_error(e) from e
        self._gpu_env = env
        self._finalizer = weakref.finalize(self, env.close)
        base = env.unwrapped
        self.device = torch.device(base.device)
        self.obs_dim = int(np.prod(base.single_observation_space.shape))
        self.act_dim = int(np.prod(base.single_action_space.shape))
        self.action_low = torch.as_tensor(np.asarray(base.single_action_space.low, np.float32).reshape(-1))
        self.action_high = torch.as_tensor(np.asarray(base.single_action_space.high, np.float32).reshape(-1))

    def _gpu_obs(self, obs: Any) -> Tensor:  # pragma: no cover - needs CUDA
        if isinstance(obs, dict):
            from mani_skill.utils.common import flatten_state_dict

            obs = flatten_state_dict(obs, use_torch=True)
        return obs.reshape(self.num_envs, -1).float()  # stays on the scene's device

    # -- VectorEnv -------------------------------------------------------------------------------------------
    def _reset(self, seeds: list[int]) -> Tensor:
        if self._gpu_env is not None:  # pragma: no cover - needs CUDA
            self._gpu_env.reset(seed=list(seeds))
            return self._gpu_obs(_reset_obs(self._gpu_env.unwrapped))
        self._require_open()
        obs, _ = self._venv.reset(seed=list(seeds))
        return torch.from_numpy(np.asarray(obs, dtype=np.float32).reshape(self.num_envs, self.obs_dim))

    def _step(self, actions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if self._gpu_env is not None:  # pragma: no cover - needs CUDA
            obs, reward, _, _, info = self._gpu_env.step(actions)  # the base class put them on self.device
            return (self._gpu_obs(obs), torch.as_tensor(reward, device=self.device).float().reshape(-1),
                    torch.as_tensor(info["success"], device=self.device).bool().reshape(-1))
        self._require_open()
        obs, reward, _, _, info = self._venv.step(actions.numpy().astype(np.float32, copy=False))
        success = np.asarray(info.get("success", np.zeros(self.num_envs)), dtype=bool).reshape(-1)
        return (torch.from_numpy(np.asarray(obs, dtype=np.float32).reshape(self.num_envs, self.obs_dim)),
                torch.from_numpy(np.asarray(reward, dtype=np.float32).reshape(-1)),
                torch.from_numpy(success.copy()))

    def _require_open(self) -> None:
        if self._venv is None:
            raise RuntimeError("ManiSkillVectorEnv is closed; build a new one")

    def close(self) -> None:
        """Shut the worker processes down (CPU) or release the GPU scene. Idempotent; also runs at garbage
        collection and interpreter exit."""
        fin = getattr(self, "_finalizer", None)
        if fin is not None:
            fin()
        self._venv = None
        self._gpu_env = None

    def __enter__(self) -> ManiSkillVectorEnv:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"ManiSkillVectorEnv(task={self.task!r}, control_mode={self.control_mode!r}, "
                f"num_envs={self.num_envs}, backend={self.backend!r}, obs_dim={self.obs_dim}, act_dim={self.act_dim})")


def _worker_pids(env: ManiSkillVectorEnv) -> list[int]:
    """PIDs of the CPU worker processes (for tests that check nothing leaks)."""
    if env._venv is None:
        return []
    return [p.pid for p in env._venv.processes]

