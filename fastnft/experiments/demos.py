"""Motion-planned demonstrations, converted to the policy's control mode and stored as one compact ``.npz``.

Pipeline per episode seed ``cfg.demos.seed + k`` (k = 0, 1, ...; failed seeds are skipped, never retried):

1. **plan**: ManiSkill3's motion-planning solution (``mani_skill.examples.motionplanning.panda.solutions``) solves
   the task in ``pd_joint_pos`` and we record its joint-position actions;
2. **convert**: ManiSkill's control-mode conversion (``mani_skill.trajectory.utils.actions.conversion``, the tool
   behind ``replay_trajectory -c pd_ee_delta_pos``) tracks the planned trajectory with ``cfg.env.control_mode``
   actions, in lockstep with a replay of the original plan;
3. **verify**: the converted float32 actions are replayed from ``reset(seed)`` in exactly the env a
   :class:`~fastnft.envs.maniskill.ManiSkillVectorEnv` worker runs (:func:`fastnft.envs.maniskill.make_single_env`),
   recording its observations, and cut at the first success as the vector env ends episodes there. Episodes that do
   not succeed within ``cfg.env.max_episode_steps`` are dropped. So observations are exactly what the vector env
   returns (including the corrected ``is_grasped = 0`` on the first observation, which ManiSkill's replayed files
   get wrong after the first episode).

A config's demonstrations live in :func:`demo_path` (``<data_dir>/<demos.path>``); :func:`load_demo_episodes` reads
them back and :func:`fastnft.chunks.chunks_from_episodes` turns episodes into the SFT training pairs.

File ``<out_dir>/<task>_<control_mode>.npz`` (see :func:`demo_file`; no pickles, ``np.load(allow_pickle=False)``):

    obs        [sum(T_e + 1), obs_dim] float32   observations of all episodes, concatenated
    actions    [sum(T_e), act_dim]     float32   actions (control-mode units, within the action bounds)
    lengths    [E] int64                         T_e, actions per episode (obs has T_e + 1 rows per episode)
    seeds      [E] int64                         env seed of each episode (reset(seed) reproduces it)
    success    [E] bool                          success at the last step (always True for stored demos)
    env_id, control_mode, obs_mode, sim_backend  0-d str
    obs_dim, act_dim, max_episode_steps, seed_start, format_version   0-d int64
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fastnft.atomic import atomic_write

if TYPE_CHECKING:
    from fastnft.config import ExperimentConfig

__all__ = ["DemoEpisode", "DemoError", "DemoSet", "demo_file", "demo_path",
           "generate_demos", "load_demo_episodes", "load_demos", "save_demos"]

FORMAT_VERSION = 1

# Env ids with a motion-planning solution for the Panda in ManiSkill 3.0.x (name of the solve function).
_SOLUTIONS = {
    "PickCube-v1": "solvePickCube",
    "PushCube-v1": "solvePushCube",
    "StackCube-v1": "solveStackCube",
    "PullCube-v1": "solvePullCube",
    "LiftPegUpright-v1": "solveLiftPegUpright",
    "PegInsertionSide-v1": "solvePegInsertionSide",
    "PlugCharger-v1": "solvePlugCharger",
    "PlaceSphere-v1": "solvePlaceSphere",
}


class DemoError(RuntimeError):
    """A demo file is missing, corrupt or made for another env; the message names the file and the fix."""


@dataclass
class DemoEpisode:
    """One demonstration.

    Attributes:
        seed: env seed; ``reset(seed)`` followed by ``actions`` reproduces ``obs``.
        obs: ``[T + 1, obs_dim]`` float32, ``obs[t]`` is seen before ``actions[t]``; ``obs[T]`` after the last action.
        actions: ``[T, act_dim]`` float32 in control-mode units (within the env's action bounds).
        success: the episode succeeded at its last step.
    """

    seed: int
    obs: np.ndarray
    actions: np.ndarray
    success: bool = True

    @property
    def length(self) -> int:
        """T, the number of actions."""
        return int(self.actions.shape[0])


@dataclass
class DemoSet:
    """Demonstrations of one env / control mode (what :func:`load_demos` returns)."""

    episodes: list[DemoEpisode]
    env_id: str
    control_mode: str
    obs_mode: str = "state"
    obs_dim: int = 0
    act_dim: int = 0
    max_episode_steps: int = 0
    seed_start: int = 0
    path: Path | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.episodes)


def demo_file(out_dir: str | Path, task: str, control_mode: str) -> Path:
    """Path of the demo file for ``task`` in ``control_mode`` under ``out_dir`` (``<task>_<control_mode>.npz``)."""
    return Path(out_dir) / f"{task}_{control_mode}.npz"


def demo_path(cfg: ExperimentConfig) -> Path:
    """Folder of the demonstrations."""
    return Path(cfg.data_dir) / cfg.demos.path


def load_demo_episodes(cfg: ExperimentConfig) -> list[tuple[Any, Any]]:
    """``[(obs [T+1, obs_dim], actions [T, act_dim])]`` of the demonstrations of ``cfg``'s task.

    Raises:
        DemoError: from :func:`load_demos`, with the fix in the message.
    """
    path = demo_file(demo_path(cfg), cfg.env.task, cfg.env.control_mode)
    ds = load_demos(path, env_id=cfg.env.task, control_mode=cfg.env.control_mode)
    return [(ep.obs, ep.actions) for ep in ds.episodes]


# -- file I/O ---------------------------------------------------------------------------------------------------

def save_demos(demos: DemoSet, path: str | Path) -> Path:
    """Write ``demos`` to ``path`` atomically (:func:`fastnft.atomic.atomic_write`). Returns the path.

    Raises:
        ValueError: an episode with inconsistent shapes.
    """
    path = Path(path)
    eps = demos.episodes
    for e in eps:
        if e.obs.ndim != 2 or e.actions.ndim != 2 or e.obs.shape[0] != e.actions.shape[0] + 1:
            raise ValueError(f"demo seed {e.seed}: obs {e.obs.shape} must be [T+1, obs_dim] for actions "
                             f"{e.actions.shape} [T, act_dim]")
    obs_dim = eps[0].obs.shape[1] if eps else demos.obs_dim
    act_dim = eps[0].actions.shape[1] if eps else demos.act_dim
    arrays = {
        "obs": (np.concatenate([e.obs for e in eps]) if eps else np.zeros((0, obs_dim))).astype(np.float32),
        "actions": (np.concatenate([e.actions for e in eps]) if eps else np.zeros((0, act_dim))).astype(np.float32),
        "lengths": np.array([e.length for e in eps], dtype=np.int64),
        "seeds": np.array([e.seed for e in eps], dtype=np.int64),
        "success": np.array([e.success for e in eps], dtype=bool),
        "env_id": np.array(demos.env_id), "control_mode": np.array(demos.control_mode),
        "obs_mode": np.array(demos.obs_mode), "sim_backend": np.array("physx_cpu"),
        "obs_dim": np.array(obs_dim, dtype=np.int64), "act_dim": np.array(act_dim, dtype=np.int64),
        "max_episode_steps": np.array(demos.max_episode_steps, dtype=np.int64),
        "seed_start": np.array(demos.seed_start, dtype=np.int64),
        "format_version": np.array(FORMAT_VERSION, dtype=np.int64),
    }
    return atomic_write(path, lambda f: np.savez_compressed(f, **arrays))


def load_demos(path: str | Path, *, env_id: str | None = None, control_mode: str | None = None) -> DemoSet:
    """Load a demo file written by :func:`generate_demos`.

    Args:
        path: the ``.npz`` file.
        env_id, control_mode: if given, the file must have been made for this env id / control mode.

    Returns:
        :class:`DemoSet` whose episodes hold ``obs [T+1, obs_dim]`` and ``actions [T, act_dim]`` float32 arrays.

    Raises:
        DemoError: file missing, unreadable/corrupt, of another format version, or for another env id or control
            mode. The message names the file and the fix (regenerate with ``generate_demos``).
    """
    path = Path(path)
    fix = "fix: (re)generate it with fastnft.experiments.demos.generate_demos(cfg, out_dir) (delete the file first if corrupt)"
    if not path.is_file():
        raise DemoError(f"demo file {str(path)!r} does not exist; {fix}")
    try:
        with np.load(path, allow_pickle=False) as z:
            d = {k: z[k] for k in z.files}
    except Exception as e:
        raise DemoError(f"demo file {str(path)!r} is unreadable or corrupt ({type(e).__name__}: {e}); {fix}") from e
    required = ("obs", "actions", "lengths", "seeds", "success", "env_id", "control_mode", "format_version")
    missing = [k for k in required if k not in d]
    if missing:
        raise DemoError(f"demo file {str(path)!r} lacks {', '.join(missing)} (not a fastnft demo file?); {fix}")
    if int(d["format_version"]) != FORMAT_VERSION:
        raise DemoError(f"demo file {str(path)!r} has format version {int(d['format_version'])}, this fastnft "
                        f"reads {FORMAT_VERSION}; {fix}")
    file_env, file_mode = str(d["env_id"]), str(d["control_mode"])
    if env_id is not None and file_env != env_id:
        raise DemoError(f"demo file {str(path)!r} holds {file_env!r} demos, expected {env_id!r}; {fix}")
    if control_mode is not None and file_mode != control_mode:
        raise DemoError(f"demo file {str(path)!r} is in control mode {file_mode!r}, expected {control_mode!r}; {fix}")
    lengths = d["lengths"].astype(np.int64)
    obs, act = d["obs"], d["actions"]
    if (obs.ndim != 2 or act.ndim != 2 or int(lengths.sum()) != act.shape[0]
            or int((lengths + 1).sum()) != obs.shape[0] or len(d["seeds"]) != len(lengths)):
        raise DemoError(f"demo file {str(path)!r} is inconsistent (obs {obs.shape}, actions {act.shape}, "
                        f"{len(lengths)} episodes); {fix}")
    a_end = np.cumsum(lengths)
    o_end = np.cumsum(lengths + 1)
    episodes = [
        DemoEpisode(seed=int(s), obs=obs[oe - t - 1:oe], actions=act[ae - t:ae], success=bool(ok))
        for s, t, ae, oe, ok in zip(d["seeds"], lengths, a_end, o_end, d["success"])
    ]
    def _int(key: str) -> int:
        return int(d[key]) if key in d else 0

    return DemoSet(episodes=episodes, env_id=file_env, control_mode=file_mode,
                   obs_mode=str(d["obs_mode"]) if "obs_mode" in d else "state",
                   obs_dim=int(obs.shape[1]), act_dim=int(act.shape[1]),
                   max_episode_steps=_int("max_episode_steps"), seed_start=_int("seed_start"), path=path)


# -- generation -------------------------------------------------------------------------------------------------

def _recorder_class() -> type:
    import gymnasium as gym

    class ActionRecorder(gym.Wrapper):
        """Records the actions passed to ``step`` since the last ``reset`` (as float32 numpy rows)."""

        def __init__(self, env: gym.Env) -> None:
            super().__init__(env)
            self.actions: list[np.ndarray] = []

        def reset(self, **kwargs):
            self.actions = []
            return self.env.reset(**kwargs)

        def step(self, action):
            a = action.detach().cpu().numpy() if hasattr(action, "detach") else np.asarray(action)
            self.actions.append(np.asarray(a, dtype=np.float32).reshape(-1))
            return self.env.step(action)

    return ActionRecorder


class _Generator:
    """Holds the three single envs (plan in pd_joint_pos, converted target, verification) for one task."""

    def __init__(self, task: str, control_mode: str, obs_mode: str, max_episode_steps: int) -> None:
        import gymnasium as gym
        from mani_skill.examples.motionplanning.panda import solutions
        from mani_skill.trajectory.utils.actions import conversion

        from fastnft.envs.maniskill import _translate_sim_error, check_task, make_single_env

        check_task(task)
        if task not in _SOLUTIONS:
            raise ValueError(f"no motion-planning solution for {task!r}; demos can be generated for "
                             f"{', '.join(_SOLUTIONS)}")
        self.solve: Callable[..., Any] = getattr(solutions, _SOLUTIONS[task])
        self.convert = conversion.from_pd_joint_pos
        self.task, self.control_mode, self.max_steps = task, control_mode, max_episode_steps
        Recorder = _recorder_class()
        long = 10 * max_episode_steps + 500  # the planner must not be cut by a time limit; we cut later
        try:
            self.plan_env = Recorder(gym.make(task, obs_mode="none", control_mode="pd_joint_pos",
                                              sim_backend="physx_cpu", render_backend="none", max_episode_steps=long))
            self.ori_env = gym.make(task, obs_mode="none", control_mode="pd_joint_pos", sim_backend="physx_cpu",
                                    render_backend="none", max_episode_steps=long)
        except Exception as e:
            raise _translate_sim_error(e) from e
        self.tgt_env = Recorder(make_single_env(task, control_mode, obs_mode, long))
        self.env = make_single_env(task, control_mode, obs_mode, max_episode_steps)
        self.obs_dim = int(np.prod(self.env.observation_space.shape))
        self.act_dim = int(np.prod(self.env.action_space.shape))
        self.low = np.asarray(self.env.action_space.low, np.float32)
        self.high = np.asarray(self.env.action_space.high, np.float32)

    def close(self) -> None:
        for e in (self.plan_env, self.ori_env, self.tgt_env, self.env):
            e.close()

    def episode(self, seed: int) -> tuple[DemoEpisode | None, str]:
        """One demo for ``seed`` or (None, reason)."""
        import contextlib
        import io

        try:  # the planner prints on failure; keep the progress bar readable
            with contextlib.redirect_stdout(io.StringIO()):
                res = self.solve(self.plan_env, seed=seed, debug=False, vis=False)
        except Exception as e:  # noqa: BLE001 - planner failures raise anything from mplib / screw motion
            return None, f"planner error: {type(e).__name__}"
        if isinstance(res, int) and res == -1:
            return None, "no plan"
        plan = np.stack(self.plan_env.actions)
        self.ori_env.reset(seed=seed)
        self.tgt_env.reset(seed=seed)
        self.convert(self.control_mode, plan, self.ori_env, self.tgt_env)
        actions = np.clip(np.stack(self.tgt_env.actions).astype(np.float32), self.low, self.high)
        # Verify: replay from reset(seed) in the vector env's own env, cut at the first success.
        obs = [self.env.reset(seed=seed)[0]]
        for t, a in enumerate(actions[: self.max_steps]):
            o, _, _, _, info = self.env.step(a)
            obs.append(o)
            if info["success"]:
                return DemoEpisode(seed=seed, obs=np.stack(obs).astype(np.float32), actions=actions[: t + 1].copy(),
                                   success=True), "ok"
        return None, f"no success within {self.max_steps} steps (converted length {len(actions)})"


def generate_demos(cfg: ExperimentConfig, out_dir: str | Path, num_demos: int | None = None, *,
                   progress: bool = True) -> Path:
    """Generate ``num_demos`` (default ``cfg.demos.num_demos``) successful demos for ``cfg.env`` into ``out_dir``.

    Seeds ``cfg.demos.seed + k`` are tried in order; failures are skipped (logged in the summary). If the file
    (:func:`demo_file`) already exists for the same env / control mode / episode limit / first seed, its episodes
    are kept and only missing ones are generated (nothing at all if it has enough). Shows a tqdm bar and prints
    timings. Runs in this process on one core (PickCube-v1: ~0.8 s per demo, 100 demos in ~80 s, ~1 % of seeds fail).

    Returns:
        Path of the ``.npz`` file (format in the module docstring).

    Raises:
        ValueError: the task has no motion-planning solution, or unknown task id.
        RuntimeError: no Vulkan device (says to run ``bash scripts/install.sh``), or far too many failed seeds.
        ConfigError: ``env.obs_mode`` is not ``state`` (demonstrations and SFT are state-only).
    """
    import torch
    from tqdm.auto import tqdm

    from fastnft.config import ConfigError

    if cfg.env.obs_mode != "state":
        raise ConfigError(f"config key 'env.obs_mode': demonstrations (and the SFT trained on them) are state-only, "
                          f"got {cfg.env.obs_mode!r}; generate them with env.obs_mode=state")
    n = cfg.demos.num_demos if num_demos is None else int(num_demos)
    if n < 1:
        raise ValueError(f"num_demos must be >= 1, got {n}")
    env_cfg = cfg.env
    path = demo_file(out_dir, env_cfg.task, env_cfg.control_mode)
    episodes: list[DemoEpisode] = []
    if path.is_file():
        try:
            old = load_demos(path, env_id=env_cfg.task, control_mode=env_cfg.control_mode)
            if (old.max_episode_steps == env_cfg.max_episode_steps and old.seed_start == cfg.demos.seed
                    and old.obs_mode == env_cfg.obs_mode):
                if len(old) >= n:
                    print(f"demos: {path} already holds {len(old)} >= {n} demos, skipping generation")
                    return path
                episodes = list(old.episodes)
        except DemoError as e:
            print(f"demos: regenerating, existing file unusable ({e})")

    t0 = time.perf_counter()
    threads = torch.get_num_threads()  # make_single_env sets one thread; the SFT after it in this process wants all
    gen = _Generator(env_cfg.task, env_cfg.control_mode, env_cfg.obs_mode, env_cfg.max_episode_steps)
    t_setup = time.perf_counter() - t0
    k = (max(e.seed for e in episodes) - cfg.demos.seed + 1) if episodes else 0
    tried, failures, n_old = 0, {}, len(episodes)
    max_tries = 3 * n + 20
    bar = tqdm(total=n, initial=len(episodes), desc=f"demos {env_cfg.task}", unit="demo", disable=not progress)
    try:
        while len(episodes) < n:
            if tried >= max_tries:
                raise RuntimeError(f"only {len(episodes)} of {n} demos succeeded after {tried} seeds "
                                   f"(failures: {failures}); check env.max_episode_steps (>= 100 for PickCube)")
            ep, why = gen.episode(cfg.demos.seed + k)
            k += 1
            tried += 1
            if ep is None:
                failures[why] = failures.get(why, 0) + 1
            else:
                episodes.append(ep)
                bar.update(1)
            bar.set_postfix(tried=tried, failed=tried - (len(episodes) - n_old))
    finally:
        bar.close()
        gen.close()
        torch.set_num_threads(threads)
    demos = DemoSet(episodes=episodes, env_id=env_cfg.task, control_mode=env_cfg.control_mode,
                    obs_mode=env_cfg.obs_mode, obs_dim=gen.obs_dim, act_dim=gen.act_dim,
                    max_episode_steps=env_cfg.max_episode_steps, seed_start=cfg.demos.seed)
    save_demos(demos, path)
    dt = time.perf_counter() - t0
    lens = [e.length for e in episodes]
    print(f"demos: {len(episodes)} demos in {path} ({tried} seeds tried this run, failures {failures or 'none'}); "
          f"{dt:.1f} s total ({t_setup:.1f} s setup); length mean {np.mean(lens):.1f} min {min(lens)} max {max(lens)}")
    return path
