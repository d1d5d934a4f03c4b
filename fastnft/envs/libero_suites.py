"""LIBERO's four evaluation suites as data: tasks, instructions, the 50 fixed init states per task, episode limits,
and the map from fastnft's episode seeds to (task, init state) pairs.

Each suite (Spatial, Object, Goal, Long = ``libero_10``) has 10 tasks x 50 fixed init states = 500 episodes. An
init state is MuJoCo's flattened ``[time, qpos, qvel]`` vector, applied with LIBERO's ``set_init_state``.

**Seeds -> episodes.** fastnft names episodes by integer seeds (``env.train_seed + k``, ``env.eval_seed + j``).
With LIBERO, seed ``s`` is the pair ``PERMUTATION[s mod 500]`` of a fixed permutation of the 500 ``(task, state)``
pairs (pair ``p`` = task ``p // 50``, state ``p % 50``), so any 500 consecutive seeds cover the suite exactly once
and a training iteration's episodes mix tasks. As in the paper, training and evaluation draw from the same 500
states (LIBERO has no held-out init states). ``env.libero_split: heldout`` instead trains on states 0-39 (400 pairs)
and evaluates on states 40-49 (100 pairs): a seed ``>= env.eval_seed`` maps into the held-out 100.

Source of the task list, order and instructions: LIBERO's ``libero_task_map`` / ``task_maps`` (task order 0, the
order of RLinf's and openpi's LIBERO evaluations).
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path

import numpy as np

__all__ = ["EPISODE_LIMITS", "HELDOUT_STATES", "NUM_STATES", "NUM_TASKS", "PERMUTATION", "SPLITS", "SUITES",
           "LiberoTask", "episode_for_seed", "init_states", "seed_for_episode", "suite_tasks"]

SUITES = ("libero_spatial", "libero_object", "libero_goal", "libero_10")
"""The four suites of the paper's table (``libero_10`` is LIBERO-Long)."""
SUITE_TITLES = {"libero_spatial": "Spatial", "libero_object": "Object", "libero_goal": "Goal", "libero_10": "Long"}
EPISODE_LIMITS = {"libero_spatial": 240, "libero_object": 240, "libero_goal": 320, "libero_10": 480}
"""Env steps per episode (20 Hz) of each suite, after the 15 settling steps: RLinf's / the paper's limits."""
NUM_TASKS = 10
NUM_STATES = 50
SETTLE_STEPS = 15
"""No-op steps with the gripper open after the init state is applied (objects settle), not counted as steps."""
SPLITS = ("shared", "heldout")
HELDOUT_STATES = range(40, 50)
"""Init states reserved for evaluation with ``env.libero_split: heldout``."""
PERMUTATION_SEED = 17
PERMUTATION = np.random.RandomState(PERMUTATION_SEED).permutation(NUM_TASKS * NUM_STATES)
"""Fixed order of the 500 ``(task, state)`` pairs (numpy's legacy ``RandomState``, stable across versions)."""
_INVERSE = np.argsort(PERMUTATION)


def _split_pairs(split: str, evaluation: bool) -> np.ndarray:
    if split == "shared":
        return PERMUTATION
    held = np.isin(PERMUTATION % NUM_STATES, list(HELDOUT_STATES))
    return PERMUTATION[held] if evaluation else PERMUTATION[~held]


def episode_for_seed(seed: int, split: str = "shared", eval_seed: int | None = None) -> tuple[int, int]:
    """The ``(task index, init-state index)`` of episode ``seed``.

    With ``split="heldout"``, seeds ``>= eval_seed`` cycle over the 100 pairs of states 40-49, other seeds over
    the 400 pairs of states 0-39 (each in :data:`PERMUTATION`'s order).

    Raises:
        ValueError: unknown split, or ``heldout`` without ``eval_seed``.
    """
    if split not in SPLITS:
        raise ValueError(f"env.libero_split must be one of {', '.join(SPLITS)}, got {split!r}")
    if split == "heldout" and eval_seed is None:
        raise ValueError("the heldout split needs eval_seed to tell evaluation seeds from training seeds")
    pairs = _split_pairs(split, split == "heldout" and seed >= eval_seed)  # type: ignore[operator]
    p = int(pairs[seed % len(pairs)])
    return p // NUM_STATES, p % NUM_STATES


def seed_for_episode(task: int, state: int, base: int) -> int:
    """The smallest seed ``>= base`` whose episode is ``(task, state)`` in the shared split (inverse of
    :func:`episode_for_seed`), so an evaluation can name exact pairs through the seed API."""
    p = task * NUM_STATES + state
    return base + (int(_INVERSE[p]) - base) % len(PERMUTATION)


@dataclass(frozen=True)
class LiberoTask:
    """One task of a suite: its index in the suite (task order 0), name, instruction and files (verified)."""

    suite: str
    index: int
    name: str
    instruction: str
    bddl: Path
    init_file: Path


def _check_suite(suite: str) -> None:
    if suite not in SUITES:
        raise ValueError(f"unknown LIBERO suite {suite!r}: choose one of {', '.join(SUITES)} (env.task)")


@cache
def suite_tasks(suite: str) -> tuple[LiberoTask, ...]:
    """The 10 tasks of ``suite`` in LIBERO's task order 0, with the paths of their verified files.

    Raises:
        ValueError: unknown suite.
        fastnft.envs.libero_assets.LiberoAssetError: LIBERO or its files are missing or differ from upstream.
    """
    _check_suite(suite)
    from fastnft.envs.libero_assets import activate, verified_root

    activate()
    root = verified_root()
    with contextlib.redirect_stdout(io.StringIO()):  # LIBERO prints on import
        from libero.libero.benchmark import task_maps
        from libero.libero.benchmark.libero_suite_task_map import libero_task_map
    out = []
    for i, name in enumerate(libero_task_map[suite]):
        t = task_maps[suite][name]
        out.append(LiberoTask(suite, i, name, t.language, root / "bddl_files" / suite / t.bddl_file,
                              root / "init_files" / suite / t.init_states_file))
    return tuple(out)


@lru_cache(maxsize=64)
def init_states(suite: str, task: int) -> np.ndarray:
    """``[50, D]`` float64 init states of one task (``D`` = 1 + nq + nv of its scene).

    The files are pickles (torch.save of a numpy array); they are loaded only after their git blob SHA-1 matched
    the upstream manifest (:func:`suite_tasks` verifies), so unpickling them is as safe as upstream LIBERO.
    """
    import torch

    t = suite_tasks(suite)[task]
    arr = np.asarray(torch.load(t.init_file, weights_only=False), dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] != NUM_STATES:
        raise ValueError(f"{t.init_file}: expected [{NUM_STATES}, D] init states, got {arr.shape}")
    return arr
