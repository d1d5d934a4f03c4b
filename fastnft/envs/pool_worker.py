"""One CPU simulator worker of :class:`fastnft.envs.pool.WorkerPool`: several single-env copies ("slots") stepped in
turn, a whole action chunk per round trip.

Run as a script by path (``python .../pool_worker.py``), never imported through the ``fastnft`` package: the
worker itself needs only numpy, so a torch-free simulator (LIBERO) keeps its process torch-free. The simulator
class is loaded from a file path (``("file", path, class)``, LIBERO's :mod:`fastnft.envs.libero_worker`) or a
module (``("module", name, class)``, ManiSkill's :class:`fastnft.envs.maniskill.ManiSkillSim`).

A simulator object is one env copy with a numpy API::

    sim = Sim(**sim_kwargs)
    obs = sim.reset(**episode)                 # {key: np.ndarray} (the layout the parent gave to attach)
    obs, reward, success = sim.step(action)    # action [act_dim] float
    sim.close()
    Sim.describe(**sim_kwargs) -> {"layout": {key: (shape, dtype)}, "act_dim", "action_low", "action_high"}  (optional)
    sim.convert(obs) -> {key: np.ndarray}      (optional: then ``step`` may return a raw observation, and only the
                                                observations the worker returns are converted)

Protocol (``fastnft.envs.pool`` sends, this answers): length-prefixed pickles on stdin / the original stdout;
everything a simulator prints goes to stderr (the worker's log file). Replies are ``("ok", value)`` or
``("error", traceback)``. Commands:

* ``init(sim, sim_kwargs, slots, max_steps)``: remember the simulator and this worker's global slot ids; the
  env copies are built lazily, on their first reset.
* ``describe()``: :meth:`describe` of the simulator class (or of a built copy): what the parent needs to lay
  out the shared observation memory.
* ``attach(path, layout, num_slots)``: map the observation file (one ``[num_slots, *shape]`` array per key,
  back to back, 64-byte aligned) that the parent reads the observations from.
* ``reset(items=[(slot, episode_kwargs)])``: start an episode in each slot, observation written to the map.
* ``chunk(items=[(slot, actions [C, act_dim])])``: execute up to C actions per slot, stopping at the episode's
  end (first success, or ``max_steps`` steps since its reset); returns ``[(slot, reward_sum, steps, success,
  done)]`` and writes each slot's last observation to the map. A slot whose episode is over is not stepped.
* ``call(slot, method, kwargs)``: any other method of one slot's simulator (tests, diagnostics).
* ``close()``.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import pickle
import struct
import sys
import traceback

# Python puts this script's folder first on sys.path, where fastnft's envs/libero.py would shadow the libero package.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import numpy as np

_HEADER = struct.Struct("<Q")
ALIGN = 64


def layout_offsets(layout: dict, num_slots: int) -> tuple[dict, int]:
    """Byte offset of each key's ``[num_slots, *shape]`` array in the observation file, and the file size.

    The parent (:mod:`fastnft.envs.pool`) computes the same offsets with this function."""
    offsets, pos = {}, 0
    for key, (shape, dtype) in layout.items():
        offsets[key] = pos
        size = int(np.prod((num_slots, *shape))) * np.dtype(dtype).itemsize
        pos += (size + ALIGN - 1) // ALIGN * ALIGN
    return offsets, max(pos, ALIGN)


def map_arrays(path: str, layout: dict, num_slots: int, mode: str) -> dict:
    """``{key: np.ndarray [num_slots, *shape]}`` views of the observation file."""
    offsets, size = layout_offsets(layout, num_slots)
    mm = np.memmap(path, dtype=np.uint8, mode=mode, shape=(size,))
    return {k: mm[offsets[k]:offsets[k] + int(np.prod((num_slots, *s))) * np.dtype(d).itemsize]
            .view(np.dtype(d)).reshape((num_slots, *s)) for k, (s, d) in layout.items()}


def read_msg(stream) -> object:
    """One length-prefixed pickle from a binary stream; raises EOFError when the other side is gone."""
    head = stream.read(_HEADER.size)
    if len(head) < _HEADER.size:
        raise EOFError
    (n,) = _HEADER.unpack(head)
    body = stream.read(n)
    if len(body) < n:
        raise EOFError
    return pickle.loads(body)


def write_msg(stream, obj: object) -> None:
    body = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_HEADER.pack(len(body)) + body)
    stream.flush()


def _load_class(spec: tuple[str, str, str]) -> type:
    kind, target, name = spec
    if kind == "file":
        mod_spec = importlib.util.spec_from_file_location(f"_fastnft_sim_{abs(hash(target))}", target)
        assert mod_spec is not None and mod_spec.loader is not None, target
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(target)
    return getattr(module, name)


class SlotWorker:
    """The env copies of one worker process and their episode bookkeeping."""

    def __init__(self) -> None:
        self.cls: type | None = None
        self.sim_kwargs: dict = {}
        self.max_steps = 0
        self.sims: dict[int, object] = {}
        self.elapsed: dict[int, int] = {}
        self.done: dict[int, bool] = {}
        self.arrays: dict | None = None

    def init(self, sim: tuple[str, str, str], sim_kwargs: dict, slots: list[int], max_steps: int) -> int:
        self.cls, self.sim_kwargs, self.max_steps = _load_class(sim), dict(sim_kwargs), int(max_steps)
        self.elapsed = {s: 0 for s in slots}
        self.done = {s: True for s in slots}
        return os.getpid()

    def describe(self) -> dict:
        assert self.cls is not None, "init first"
        return self.cls.describe(**self.sim_kwargs)

    def attach(self, path: str, layout: dict, num_slots: int) -> None:
        self.arrays = map_arrays(path, layout, num_slots, "r+")

    def _sim(self, slot: int):
        sim = self.sims.get(slot)
        if sim is None:
            assert self.cls is not None, "init first"
            sim = self.sims[slot] = self.cls(**self.sim_kwargs)
        return sim

    def _write(self, slot: int, obs: dict) -> None:
        assert self.arrays is not None, "attach first"
        for k, arr in self.arrays.items():
            arr[slot] = obs[k]

    def reset(self, items: list) -> None:
        for slot, episode in items:
            self._write(slot, self._sim(slot).reset(**episode))
            self.elapsed[slot], self.done[slot] = 0, False

    def chunk(self, items: list) -> list:
        out = []
        for slot, actions in items:
            total, steps, success, obs = 0.0, 0, False, None
            sim = self.sims.get(slot)
            for a in actions:
                if self.done[slot] or sim is None:
                    break
                obs, r, s = sim.step(a)
                total += float(r)
                steps += 1
                self.elapsed[slot] += 1
                if s:
                    success = True
                if s or self.elapsed[slot] >= self.max_steps:
                    self.done[slot] = True
            if obs is not None:
                convert = getattr(sim, "convert", None)  # a simulator may return raw observations (see above)
                self._write(slot, convert(obs) if convert is not None else obs)
            out.append((slot, total, steps, success, self.done[slot]))
        return out

    def call(self, slot: int, method: str, kwargs: dict) -> object:
        return getattr(self._sim(slot), method)(**kwargs)

    def close(self) -> None:
        for sim in self.sims.values():
            try:
                sim.close()
            except Exception:  # noqa: BLE001 - closing anyway
                traceback.print_exc()
        self.sims.clear()


def main() -> None:
    proto_out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # simulators print to stdout; keep the protocol channel clean
    sys.stdout = sys.stderr
    proto_in = sys.stdin.buffer
    worker = SlotWorker()
    while True:
        try:
            cmd, kwargs = read_msg(proto_in)
        except EOFError:  # the parent went away
            break
        try:
            reply = ("ok", getattr(worker, cmd)(**kwargs))
        except Exception:  # noqa: BLE001 - sent to the parent, which decides (restart the worker)
            reply = ("error", traceback.format_exc())
            print(reply[1], file=sys.stderr, flush=True)
        write_msg(proto_out, reply)
        if cmd == "close":
            break


if __name__ == "__main__":
    main()
