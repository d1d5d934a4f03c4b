"""Toy simulators for the worker pool's tests (loaded by the pool's workers from this file's path; numpy only).

``LineSim``: a point on a line. ``reset(seed)`` puts it at ``x0 = (seed % 7) / 7``; ``step(a)`` moves it by
``0.1 * a[0]``; success when ``x > 1``; reward ``x``. Observation ``{"state": [seed, t, x]}``.
``crash_seed`` (constructor): the sim raises inside ``step`` at ``t == 2`` of that seed's episode, every time, or
only while ``marker`` (a file path) does not exist yet (it is created before raising: "crash once").
"""

from __future__ import annotations

import os
import sys

import numpy as np

LAYOUT = {"state": ((3,), "<f4")}


class LineSim:
    def __init__(self, crash_seed: int = -1, marker: str = "") -> None:
        self.crash_seed, self.marker = crash_seed, marker
        self.seed, self.t, self.x = 0, 0, 0.0

    @classmethod
    def describe(cls, **kwargs) -> dict:
        return {"layout": LAYOUT, "act_dim": 2, "action_low": np.full(2, -1.0, np.float32),
                "action_high": np.full(2, 1.0, np.float32)}

    def _obs(self) -> dict:
        return {"state": np.array([self.seed, self.t, self.x], dtype=np.float32)}

    def reset(self, seed: int) -> dict:
        self.seed, self.t, self.x = int(seed), 0, (int(seed) % 7) / 7
        return self._obs()

    def step(self, action: np.ndarray):
        self.t += 1
        crash_now = not self.marker or not os.path.exists(self.marker)
        if self.seed == self.crash_seed and self.t == 2 and crash_now:
            if self.marker:
                open(self.marker, "w").close()
            print(f"LineSim: simulated PhysX failure at seed {self.seed}", file=sys.stderr, flush=True)
            raise RuntimeError(f"simulated crash at seed {self.seed}")
        self.x += 0.1 * float(action[0])
        return self._obs(), self.x, self.x > 1.0

    def close(self) -> None:
        pass
