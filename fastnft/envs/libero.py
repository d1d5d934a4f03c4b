"""LIBERO (Spatial / Object / Goal / Long) behind the batched :class:`~fastnft.envs.base.VectorEnv` API.

``env.task: libero_spatial | libero_object | libero_goal | libero_10`` names a suite; each episode is one of the
suite's 500 ``(task, init state)`` pairs, chosen by its seed (:mod:`fastnft.envs.libero_suites`). N envs run in N
worker processes (:mod:`fastnft.envs.libero_worker`, started as scripts so that they import neither torch nor
fastnft: about 180 MiB less each), one single-env LIBERO sim per worker, built on its first reset and rebuilt only
when the worker's task changes (a new task is a new MuJoCo model; the same task is a soft reset). Before any
worker starts, every file LIBERO opens is checked against the upstream manifest
(:mod:`fastnft.envs.libero_assets`) and the workers get a private ``LIBERO_CONFIG_PATH``.

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
driver on a GPU host, device chosen with ``MUJOCO_EGL_DEVICE_ID``) or ``osmesa`` (``env.libero_gl``).
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import tempfile
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from fastnft.envs.base import STATE_KEY, TASK_KEY, EnvObs, VectorEnv, image_key
from fastnft.envs.libero_suites import (
    EPISODE_LIMITS,
    SETTLE_STEPS,
    SUITES,
    episode_for_seed,
    init_states,
    suite_tasks,
)

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


class _Worker:
    """One worker process: pickled commands on its stdin, pickled replies on its stdout, its log in a file."""

    def __init__(self, env: dict[str, str]) -> None:
        self.log = tempfile.NamedTemporaryFile(prefix="fastnft-libero-worker-", suffix=".log", delete=False)  # noqa: SIM115 - the worker's stderr for its lifetime
        self.proc = subprocess.Popen([sys.executable, "-u", str(WORKER)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log, env=env, close_fds=True)

    def send(self, cmd: str, **kwargs: Any) -> None:
        try:
            pickle.dump((cmd, kwargs), self.proc.stdin, protocol=pickle.HIGHEST_PROTOCOL)
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError) as e:
            raise RuntimeError(f"LIBERO worker {self.proc.pid} is gone ({e}); its log:\n{self._tail()}") from e

    def recv(self) -> Any:
        try:
            status, value = pickle.load(self.proc.stdout)
        except EOFError as e:
            raise RuntimeError(f"LIBERO worker {self.proc.pid} exited (status {self.proc.poll()}); its log:\n"
                               f"{self._tail()}") from e
        if status != "ok":
            raise RuntimeError(f"LIBERO worker {self.proc.pid} failed:\n{value}")
        return value

    def _tail(self, n: int = 20) -> str:
        try:
            return "\n".join(Path(self.log.name).read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send("close")
                self.proc.wait(timeout=10)
            except Exception:  # noqa: BLE001, S110 - best effort; killed below
                pass
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                f.close()
        self.log.close()
        Path(self.log.name).unlink(missing_ok=True)


def _close_all(workers: list[_Worker]) -> None:
    for w in workers:
        try:
            w.close()
        except Exception:  # noqa: BLE001, S110 - best effort at interpreter exit  # pragma: no cover
            pass


class LiberoVectorEnv(VectorEnv):
    """N LIBERO envs of one suite, stepped in lockstep (see the module docstring).

    Args:
        cfg: env config; uses ``task`` (the suite), ``obs_mode``, ``cameras``, ``camera_slots``, ``image_size``,
            ``max_episode_steps`` (null = the suite's limit), ``libero_split``, ``eval_seed``, ``delta_actions``,
            ``libero_gl``.
        num_envs: N worker processes (each ~2.2 GiB RSS with two cameras; see docs/libero.md).

    Attributes:
        suite: the suite name; ``tasks``: its 10 :class:`~fastnft.envs.libero_suites.LiberoTask`.
        episodes: ``[(task, state)]`` of the current episode of each env (after :meth:`reset`).
        obs_dim: 8; act_dim: 7; action bounds ``[-1, 1]``.

    Raises:
        ValueError: not a LIBERO suite, ``num_envs < 1``, or a camera LIBERO lacks.
        fastnft.envs.libero_assets.LiberoAssetError: LIBERO or its files are missing or differ from upstream.
    """

    def __init__(self, cfg: EnvConfig, num_envs: int) -> None:
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
        self.episodes: list[tuple[int, int]] = []
        self._last: list[dict[str, np.ndarray]] = []
        env = dict(os.environ)
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
            env.setdefault(var, "1")  # one sim per process: N workers with N BLAS thread pools would oversubscribe
        env.setdefault("MUJOCO_GL", cfg.libero_gl)
        if env["MUJOCO_GL"] == "osmesa":
            env.setdefault("PYOPENGL_PLATFORM", "osmesa")
        elif env["MUJOCO_GL"] == "egl":
            env.setdefault("PYOPENGL_PLATFORM", "egl")
        self._workers: list[_Worker] = []
        try:
            for _ in range(self.num_envs):
                self._workers.append(_Worker(env))
        except Exception:
            _close_all(self._workers)
            raise
        self._finalizer = weakref.finalize(self, _close_all, self._workers)

    # -- worker calls ---------------------------------------------------------------------------------------------
    def _all(self, cmd: str, kwargs: list[dict[str, Any]], which: list[int] | None = None) -> list[Any]:
        """Send ``cmd`` to the workers in ``which`` (all by default) first, then collect: they run in parallel."""
        if not self._workers:
            raise RuntimeError("LiberoVectorEnv is closed; build a new one")
        idx = list(range(self.num_envs)) if which is None else which
        for i in idx:
            self._workers[i].send(cmd, **kwargs[i])
        return [self._workers[i].recv() for i in idx]

    def call(self, i: int, cmd: str, **kwargs: Any) -> Any:
        """Run a worker command on env ``i`` (``get_state``, ``object_positions``, ``place_object``; for tests and
        diagnostics, see :mod:`fastnft.envs.libero_worker`)."""
        self._workers[i].send(cmd, **kwargs)
        return self._workers[i].recv()

    def _batch(self, obs: list[dict[str, np.ndarray]]) -> EnvObs:
        state = torch.from_numpy(np.stack([o["state"] for o in obs]).astype(np.float32))
        if not self.rgb:
            return state
        out: dict[str, Any] = {image_key(self.slots[c]): torch.from_numpy(np.stack([o[c] for o in obs]))
                               for c in self.cameras}
        out[STATE_KEY] = state
        out[TASK_KEY] = [self.tasks[t].instruction for t, _ in self.episodes]
        return out

    # -- VectorEnv ------------------------------------------------------------------------------------------------
    def _reset(self, seeds: list[int]) -> EnvObs:
        self.episodes = [episode_for_seed(s, self.split, self.eval_seed) for s in seeds]
        kw = [{"bddl": str(self.tasks[t].bddl), "init_state": init_states(self.suite, t)[k],
               "cameras": self.cameras, "image_size": self.image_size, "settle_steps": SETTLE_STEPS}
              for t, k in self.episodes]
        self._last = self._all("reset", kw)
        return self._batch(self._last)

    def _step(self, actions: Tensor) -> tuple[EnvObs, Tensor, Tensor]:
        act = actions.numpy().astype(np.float64)
        active = [i for i in range(self.num_envs) if not bool(self.done[i])]  # ended envs are not stepped
        reward = torch.zeros(self.num_envs)
        success = torch.zeros(self.num_envs, dtype=torch.bool)
        res = self._all("step", [{"action": act[i]} for i in range(self.num_envs)], active)
        for i, (obs, r, s) in zip(active, res, strict=True):
            self._last[i] = obs
            reward[i], success[i] = r, s
        return self._batch(self._last), reward, success

    def step_chunk(self, actions: Tensor) -> Any:
        """Execute ``[N, C, 7]`` actions step by step (see :meth:`VectorEnv.step_chunk`). With
        ``env.delta_actions`` the policy's actions are ``a[:6] - state[:6]``: the state of the observation the
        policy saw (the last one) is added back to every step of the chunk first (RLinf / openpi)."""
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
        self._workers = []

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def worker_pids(self) -> list[int]:
        """PIDs of the worker processes (for memory measurements and leak checks)."""
        return [w.proc.pid for w in self._workers]

    def __repr__(self) -> str:
        cams = f", cameras={list(self.cameras)}, image_size={self.image_size}" if self.rgb else ""
        return (f"LiberoVectorEnv(suite={self.suite!r}, num_envs={self.num_envs}, "
                f"max_episode_steps={self.max_episode_steps}, split={self.split!r}{cams})")
