"""LIBERO (Spatial / Object / Goal / Long) behind the batched :class:`~fastnft.envs.base.VectorEnv` API.

``env.task: libero_spatial | libero_object | libero_goal | libero_10`` names a suite; each episode is one of the
suite's 500 ``(task, init state)`` pairs, chosen by its seed (:mod:`fastnft.envs.libero_suites`). The N env slots
run in a :class:`~fastnft.envs.pool.WorkerPool` (``env.num_workers`` processes, started as scripts so that they
import neither torch nor fastnft: about 180 MiB less each), one single-env LIBERO sim per slot
(:class:`fastnft.envs.libero_worker.Worker`), built on its first reset and rebuilt only when the slot's task
changes (a new task is a new MuJoCo model; the same task is a soft reset). A worker executes a whole action chunk
per round trip and stops each slot at its episode's end; a worker that dies is replaced. Before any worker
starts, every file LIBERO opens is checked against the upstream manifest (:mod:`fastnft.envs.libero_assets`) and
the workers get a private ``LIBERO_CONFIG_PATH``.

Episode start (the LIBERO protocol of openpi and RLinf): reset, ``set_init_state`` with the pair's flattened
``[time, qpos, qvel]``, then 15 no-op steps with the gripper open (not counted). Actions ``[N, 7]`` in
``[-1, 1]``: OSC_POSE end-effector deltas (xyz, axis-angle) + gripper (+1 closes, -1 opens), 20 Hz. Success is
LIBERO's BDDL goal check (LIBERO's ``done``); reward 1.0 at success, else 0. The episode limit is the suite's
(:data:`~fastnft.envs.libero_suites.EPISODE_LIMITS`) unless ``env.max_episode_steps`` is set.

Observations with ``env.obs_mode: rgb`` (lerobot's keys):

* ``observation.images.<slot>``: ``[N, H, W, 3]`` uint8 per camera in ``env.cameras`` (``agentview``, ``wrist``;
  ``<slot>`` is the camera's name or its ``env.camera_slots`` entry), rendered at ``env.image_size`` (256 by
  default; the pi0 processor resizes with padding to 224) and rotated 180 degrees (MuJoCo's images are upside
  down; openpi, RLinf and lerobot flip them the same way);
* ``observation.state``: ``[N, 8]`` float32, ``eef_pos (3) + axis_angle(eef_quat) (3) + gripper_qpos (2)``;
* ``task``: N strings, each env's task instruction.

With ``env.obs_mode: state`` the observation is the ``[N, 8]`` state alone and no camera is rendered.

Rendering uses MuJoCo's offscreen GL: ``MUJOCO_GL=egl`` (default; Mesa's llvmpipe on a CPU machine, the NVIDIA
driver on a GPU host, on the rank's own GPU: ``MUJOCO_EGL_DEVICE_ID`` is set from the rank's visible device unless
already set, :func:`fastnft.devices.egl_device_id`) or ``osmesa`` (``env.libero_gl``).
"""

from __future__ import annotations

import os
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from fastnft.devices import egl_device_id, local_rank
from fastnft.envs.base import STATE_KEY, TASK_KEY, ChunkResult, EnvObs, image_key
from fastnft.envs.libero_suites import (
    EPISODE_LIMITS,
    SETTLE_STEPS,
    SUITES,
    episode_for_seed,
    init_states,
    suite_tasks,
)
from fastnft.envs.pool import PooledEnv, WorkerPool, default_workers

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self needs 3.11; requires-python is 3.10

    from fastnft.config import EnvConfig

__all__ = ["LIBERO_CAMERAS", "LiberoVectorEnv", "is_libero_task"]

LIBERO_CAMERAS = ("agentview", "wrist")
"""Camera names of ``env.cameras`` for LIBERO: the third-person ``agentview`` and ``robot0_eye_in_hand``."""
STATE_DIM = 8
ACT_DIM = 7
WORKER = Path(__file__).with_name("libero_worker.py")


def is_libero_task(task: str) -> bool:
    """Whether ``env.task`` names a LIBERO suite."""
    return task in SUITES


class LiberoVectorEnv(PooledEnv):
    """N LIBERO envs of one suite, stepped in lockstep (see the module docstring).

    Args:
        cfg: env config; uses ``task`` (the suite), ``obs_mode``, ``cameras``, ``camera_slots``, ``image_size``,
            ``max_episode_steps`` (null = the suite's limit), ``libero_split``, ``eval_seed``, ``delta_actions``,
            ``libero_gl``.
        num_envs: N env slots (one LIBERO sim each; a worker with one sim is ~2.2 GiB RSS with two cameras, see
            docs/libero.md).
        num_workers: worker processes (None = ``cfg.num_workers``, null there = one per usable core, at most N).

    Attributes:
        suite: the suite name; ``tasks``: its 10 :class:`~fastnft.envs.libero_suites.LiberoTask`.
        episodes: ``[(task, state)]`` of the current episode of each slot (``(-1, -1)`` before its first reset).
        obs_dim: 8; act_dim: 7; action bounds ``[-1, 1]``.

    Raises:
        ValueError: not a LIBERO suite, ``num_envs < 1``, or a camera LIBERO lacks.
        fastnft.envs.libero_assets.LiberoAssetError: LIBERO or its files are missing or differ from upstream.
    """

    def __init__(self, cfg: EnvConfig, num_envs: int, num_workers: int | None = None) -> None:
        super().__init__()
        if not is_libero_task(cfg.task):
            raise ValueError(f"unknown LIBERO suite {cfg.task!r}: choose one of {', '.join(SUITES)} (env.task)")
        if num_envs < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        self.suite = cfg.task
        self.rgb = cfg.obs_mode == "rgb"
        self.cameras: tuple[str, ...] = tuple(cfg.cameras) if self.rgb else ()
        bad = [c for c in self.cameras if c not in LIBERO_CAMERAS]
        if bad:
            raise ValueError(f"config key 'env.cameras': LIBERO has no camera {', '.join(map(repr, bad))}; its "
                             f"cameras are {', '.join(LIBERO_CAMERAS)}")
        self.slots = {c: (cfg.camera_slots or {}).get(c, c) for c in self.cameras}
        self.image_size = int(cfg.image_size or 256)
        self.num_envs = int(num_envs)
        self.obs_dim, self.act_dim = STATE_DIM, ACT_DIM
        self.max_episode_steps = int(cfg.max_episode_steps or EPISODE_LIMITS[self.suite])
        self.split, self.eval_seed = cfg.libero_split, cfg.eval_seed
        self.delta_actions = bool(cfg.delta_actions)
        self.action_low = -torch.ones(ACT_DIM)
        self.action_high = torch.ones(ACT_DIM)
        self.tasks = suite_tasks(self.suite)  # verifies every LIBERO file and sets LIBERO_CONFIG_PATH
        self.episodes: list[tuple[int, int]] = [(-1, -1)] * self.num_envs
        env = dict(os.environ)
        env.setdefault("MUJOCO_GL", cfg.libero_gl)
        if env["MUJOCO_GL"] == "osmesa":
            env.setdefault("PYOPENGL_PLATFORM", "osmesa")
        elif env["MUJOCO_GL"] == "egl":
            env.setdefault("PYOPENGL_PLATFORM", "egl")
        if env["MUJOCO_GL"] == "egl" and "MUJOCO_EGL_DEVICE_ID" not in env and torch.cuda.is_available():
            # co-location: render on this rank's own GPU (the physical index of its visible device)
            egl = egl_device_id(torch.device("cuda", local_rank()))
            if egl is not None:
                env["MUJOCO_EGL_DEVICE_ID"] = egl
        workers = num_workers if num_workers is not None else cfg.num_workers
        self.num_workers = int(workers) if workers else default_workers(self.num_envs)
        layout: dict[str, tuple[tuple[int, ...], str]] = {"state": ((STATE_DIM,), "<f4")}
        layout.update({c: ((self.image_size, self.image_size, 3), "|u1") for c in self.cameras})
        self._pool = WorkerPool(("file", str(WORKER), "Worker"), {}, self.num_envs,
                                min(self.num_workers, self.num_envs), self.max_episode_steps, layout=layout, env=env,
                                name="pool")
        self._finalizer = weakref.finalize(self, self._pool.close)

    # -- worker calls ---------------------------------------------------------------------------------------------
    def call(self, i: int, cmd: str, **kwargs: Any) -> Any:
        """Run a simulator method on env slot ``i`` (``get_state``, ``object_positions``, ``place_object``,
        ``raw_frames``; for tests and diagnostics, see :mod:`fastnft.envs.libero_worker`).

        Raises:
            RuntimeError: the env is closed, or the worker failed (it is replaced; the message has its log).
        """
        self._require_open()
        assert self._pool is not None
        return self._pool.call(i, cmd, **kwargs)

    # -- PooledEnv ------------------------------------------------------------------------------------------------
    def _episode(self, slot: int, seed: int) -> dict[str, Any]:
        t, k = episode_for_seed(seed, self.split, self.eval_seed)
        self.episodes[slot] = (t, k)
        return {"bddl": str(self.tasks[t].bddl), "init_state": init_states(self.suite, t)[k],
                "cameras": self.cameras, "image_size": self.image_size, "settle_steps": SETTLE_STEPS}

    def _pool_obs(self) -> EnvObs:
        assert self._pool is not None
        arrays = self._pool.arrays
        state = torch.from_numpy(np.array(arrays["state"], dtype=np.float32))
        if not self.rgb:
            return state
        out: dict[str, Any] = {image_key(self.slots[c]): torch.from_numpy(np.array(arrays[c], dtype=np.uint8))
                               for c in self.cameras}
        out[STATE_KEY] = state
        out[TASK_KEY] = [self.tasks[t].instruction if t >= 0 else "" for t, _ in self.episodes]
        return out

    def _require_open(self) -> None:
        if getattr(self, "_closed", False):
            raise RuntimeError("LiberoVectorEnv is closed; build a new one")

    def _reset_slots(self, slots: list[int], seeds: list[int]) -> EnvObs:
        self._require_open()
        return super()._reset_slots(slots, seeds)

    def step_chunk(self, actions: Tensor) -> ChunkResult:
        """Execute ``[N, C, 7]`` actions (see :meth:`VectorEnv.step_chunk`). With ``env.delta_actions`` the policy's
        actions are ``a[:6] - state[:6]``: the state of the observation the policy saw (the last one) is added back
        to every step of the chunk first (RLinf / openpi)."""
        self._require_open()
        if self.delta_actions and self._obs is not None:
            state = self._obs[STATE_KEY] if isinstance(self._obs, dict) else self._obs
            actions = actions.clone()
            actions[..., :6] += state[:, None, :6].to(actions.device, actions.dtype)
        return super().step_chunk(actions)

    def close(self) -> None:
        """Stop the worker processes. Idempotent; also runs at garbage collection and interpreter exit."""
        fin = getattr(self, "_finalizer", None)
        if fin is not None:
            fin()
        self._pool = None
        self._closed = True

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        cams = f", cameras={list(self.cameras)}, image_size={self.image_size}" if self.rgb else ""
        return (f"LiberoVectorEnv(suite={self.suite!r}, num_envs={self.num_envs}, num_workers={self.num_workers}, "
                f"max_episode_steps={self.max_episode_steps}, split={self.split!r}{cams})")
