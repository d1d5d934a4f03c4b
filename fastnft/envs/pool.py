"""CPU simulator workers: one process per core, each stepping several single-env copies, a whole action chunk per
round trip, observations in shared memory, and a dead worker replaced.

:class:`WorkerPool` is what :class:`~fastnft.envs.maniskill.ManiSkillVectorEnv` (CPU backend) and
:class:`~fastnft.envs.libero.LiberoVectorEnv` run on. ``num_slots`` env copies ("slots", the vector env's N) are
split into contiguous blocks over ``num_workers`` processes (:mod:`fastnft.envs.pool_worker`, started as scripts).
A call sends its command to every worker concerned first, then collects the replies, so the workers step their
slots in parallel. Each worker writes its slots' observations into one memory-mapped file (in ``/dev/shm`` where
it exists) that this process reads; the pipes carry only commands, actions and per-slot scalars.

A worker that dies (killed, or an exception inside the simulator) is replaced by a fresh process: the slots it held
are reported as *lost*, with the last lines of its log, and their episodes must be started again (the rollout
reruns them from their seeds, :func:`fastnft.loop.rollout.run_episodes`). ``restarts`` counts replacements.

Files: each pool owns one private folder ``fastnft-pool-<pid>-*`` (the observation file and one log per worker),
removed by :meth:`WorkerPool.close` (also at garbage collection and interpreter exit). A folder left by a process
that was killed is removed by the next pool that starts (:func:`clean_stale_dirs`).
"""

from __future__ import annotations

import os
import pickle
import re
import select
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fastnft.envs.base import EnvObs, VectorEnv
from fastnft.envs.pool_worker import _HEADER, layout_offsets, map_arrays, write_msg

__all__ = ["PooledEnv", "WorkerLost", "WorkerPool", "clean_stale_dirs", "default_workers", "pool_base_dir"]

WORKER = Path(__file__).with_name("pool_worker.py")
_DIR_RE = re.compile(r"^fastnft-(?:pool|libero)-(\d+)-")


class WorkerLost(RuntimeError):
    """A worker process died or failed; its slots' episodes are lost (the message has its last log lines)."""


def default_workers(num_slots: int) -> int:
    """Worker processes when ``env.num_workers`` is null: one per usable core, at most one per slot."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    return max(1, min(int(num_slots), cores))


def pool_base_dir() -> Path:
    """Where private pool folders go: ``/dev/shm`` (memory-backed) when writable, else the temp directory."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        return shm
    return Path(tempfile.gettempdir())


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - another user's process
        return True
    return True


def clean_stale_dirs(base: Path | None = None) -> list[Path]:
    """Remove private folders (``fastnft-pool-<pid>-*``, ``fastnft-libero-<pid>-*``) whose process is gone, in
    ``base`` (default: :func:`pool_base_dir` and the temp directory). Returns what was removed."""
    removed = []
    for root in ([base] if base is not None else {pool_base_dir(), Path(tempfile.gettempdir())}):
        try:
            entries = list(root.iterdir())
        except OSError:
            continue
        for p in entries:
            m = _DIR_RE.match(p.name)
            if m and p.is_dir() and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


def _tail(path: Path, n: int = 20) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(lines[-n:]) or "(empty log)"


class _Proc:
    """One worker process: commands on its stdin, replies on its stdout, its stderr in ``log``."""

    def __init__(self, index: int, folder: Path, env: dict[str, str], generation: int) -> None:
        self.index = index
        self.log = folder / f"worker{index}.{generation}.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-u", str(WORKER)], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=log, env=env, close_fds=True)
        self.pid = self.proc.pid

    def send(self, cmd: str, **kwargs: Any) -> None:
        """Raises WorkerLost when the process is gone."""
        try:
            write_msg(self.proc.stdin, (cmd, kwargs))
        except (BrokenPipeError, OSError, ValueError) as e:
            raise WorkerLost(self._why(f"is gone ({e})")) from e

    def recv(self, timeout: float) -> Any:
        """The reply's value. Raises WorkerLost on exit, an error reply, or no reply within ``timeout`` s."""
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout

        def read(n: int) -> bytes:
            buf = bytearray()
            while len(buf) < n:
                left = deadline - time.monotonic()
                ready, _, _ = select.select([fd], [], [], max(left, 0.0))
                if not ready:
                    raise WorkerLost(self._why(f"sent no reply within {timeout:.0f} s (hung)"))
                chunk = os.read(fd, n - len(buf))
                if not chunk:
                    raise WorkerLost(self._why("exited"))
                buf += chunk
            return bytes(buf)

        (n,) = _HEADER.unpack(read(_HEADER.size))
        status, value = pickle.loads(read(n))
        if status != "ok":
            raise WorkerLost(self._why(f"failed:\n{value}"))
        return value

    def _why(self, what: str) -> str:
        if what == "exited" or what.startswith("is gone"):
            try:
                self.proc.wait(timeout=2)  # reap it so that its exit status is known
            except subprocess.TimeoutExpired:
                pass
        status = self.proc.poll()
        if status is not None and what == "exited":
            what = f"exited (status {status}{', killed by signal ' + str(-status) if status < 0 else ''})"
        return f"worker {self.index} (pid {self.pid}) {what}; its last log lines:\n{_tail(self.log)}"

    def close(self, graceful: bool = True) -> None:
        if graceful and self.proc.poll() is None:
            try:
                self.send("close")
                self.proc.wait(timeout=10)
            except Exception:  # noqa: BLE001, S110 - killed below
                pass
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                try:
                    f.close()
                except OSError:  # pragma: no cover - broken pipe on close
                    pass


def _close_pool(procs: list[_Proc], folder: Path) -> None:
    for p in procs:
        try:
            p.close()
        except Exception:  # noqa: BLE001, S110 - best effort at interpreter exit  # pragma: no cover
            pass
    shutil.rmtree(folder, ignore_errors=True)


class WorkerPool:
    """``num_slots`` single-env simulator copies in ``num_workers`` processes (see the module docstring).

    Args:
        sim: the simulator class, ``("module", "package.module", "Class")`` or ``("file", "/path.py", "Class")``
            (see :mod:`fastnft.envs.pool_worker` for its API).
        sim_kwargs: passed to every copy's constructor (picklable).
        num_slots: N env copies.
        num_workers: processes (<= N); each holds a contiguous block of slots.
        max_steps: episode length limit in env steps (the worker stops a slot's episode there).
        layout: ``{key: (shape, dtype)}`` of one observation; None = ask the simulator class (``describe``).
        env: environment variables of the workers (default: this process's, with one BLAS / OpenMP thread).
        timeout: seconds a worker may take for one command before it counts as hung and is replaced.

    Attributes:
        arrays: ``{key: np.ndarray [N, *shape]}`` the slots' latest observations (read-only views: copy them).
        spec: what ``describe`` returned (``{}`` when ``layout`` was given).
        restarts: workers replaced so far. failures: ``{slot: message}`` of the last loss of each slot.

    Raises:
        WorkerLost: a worker fails while starting (the message has its log).
        ValueError: ``num_slots < 1`` or ``num_workers`` outside ``1..num_slots``.
    """

    def __init__(self, sim: tuple[str, str, str], sim_kwargs: dict[str, Any], num_slots: int, num_workers: int,
                 max_steps: int, *, layout: dict[str, tuple[tuple[int, ...], str]] | None = None,
                 env: dict[str, str] | None = None, timeout: float = 600.0, name: str = "pool") -> None:
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}")
        if not 1 <= num_workers <= num_slots:
            raise ValueError(f"num_workers must be in 1..{num_slots} (one slot at least per worker), got {num_workers}")
        self.sim, self.sim_kwargs = sim, dict(sim_kwargs)
        self.num_slots, self.num_workers, self.max_steps = int(num_slots), int(num_workers), int(max_steps)
        self.timeout = float(timeout)
        self.restarts = 0
        self.failures: dict[int, str] = {}
        self.sim_steps = 0
        blocks = np.array_split(np.arange(self.num_slots), self.num_workers)
        self.slots_of = [[int(s) for s in b] for b in blocks]
        self.worker_of = {s: w for w, b in enumerate(self.slots_of) for s in b}
        clean_stale_dirs()
        self.folder = Path(tempfile.mkdtemp(prefix=f"fastnft-{name}-{os.getpid()}-", dir=pool_base_dir()))
        self._env = dict(os.environ if env is None else env)
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
            self._env.setdefault(var, "1")  # one sim per process at a time: several BLAS pools would oversubscribe
        self._procs: list[_Proc] = []
        self._generation = 0
        self._finalizer = weakref.finalize(self, _close_pool, self._procs, self.folder)
        try:
            for w in range(self.num_workers):
                self._procs.append(self._start(w))
            for p in self._procs:
                p.recv(self.timeout)  # init
            self.spec: dict[str, Any] = {}
            if layout is None:
                self._procs[0].send("describe")
                self.spec = self._procs[0].recv(self.timeout)
                layout = self.spec["layout"]
            self.layout = {k: (tuple(int(x) for x in s), str(d)) for k, (s, d) in layout.items()}
            self.path = self.folder / "obs.bin"
            with open(self.path, "wb") as f:
                f.truncate(layout_offsets(self.layout, self.num_slots)[1])
            self.arrays = map_arrays(str(self.path), self.layout, self.num_slots, "r+")
            for p in self._procs:
                self._attach(p)
            for p in self._procs:
                p.recv(self.timeout)
        except BaseException:
            self.close()
            raise

    # -- processes ------------------------------------------------------------------------------------------------
    def _start(self, w: int) -> _Proc:
        self._generation += 1
        p = _Proc(w, self.folder, self._env, self._generation)
        p.send("init", sim=self.sim, sim_kwargs=self.sim_kwargs, slots=self.slots_of[w], max_steps=self.max_steps)
        return p

    def _attach(self, p: _Proc) -> None:
        p.send("attach", path=str(self.path), layout=self.layout, num_slots=self.num_slots)

    def _replace(self, w: int, why: str) -> None:
        """Kill worker ``w`` and start a fresh one in its place; its slots are lost (recorded in ``failures``)."""
        old = self._procs[w]
        old.close(graceful=False)
        for s in self.slots_of[w]:
            self.failures[s] = why
        lines = [ln for ln in why.splitlines() if ln.strip()]
        last = f" ({lines[-1].strip()})" if len(lines) > 1 else ""
        warnings.warn(f"simulator {lines[0].rstrip(':')}{last}; restarting it, its {len(self.slots_of[w])} env(s) "
                      "lose their episodes", RuntimeWarning, stacklevel=3)
        p = self._start(w)
        p.recv(self.timeout)
        self._attach(p)
        p.recv(self.timeout)
        self._procs[w] = p
        self.restarts += 1

    def _run(self, cmd: str, per_worker: dict[int, dict[str, Any]]) -> tuple[dict[int, Any], set[int]]:
        """Send ``cmd`` to each worker of ``per_worker`` (kwargs each), then collect. Returns (replies by worker,
        lost workers). A lost worker is replaced before this returns."""
        if not self._procs:
            raise RuntimeError("the simulator pool is closed; build a new env")
        replies, lost = {}, {}
        sent = []
        for w, kw in per_worker.items():
            try:
                self._procs[w].send(cmd, **kw)
                sent.append(w)
            except WorkerLost as e:
                lost[w] = str(e)
        for w in sent:
            try:
                replies[w] = self._procs[w].recv(self.timeout)
            except WorkerLost as e:
                lost[w] = str(e)
        for w, why in lost.items():
            self._replace(w, why)
        return replies, set(lost)

    # -- commands -------------------------------------------------------------------------------------------------
    def reset(self, items: list[tuple[int, dict[str, Any]]]) -> set[int]:
        """Start one episode per ``(slot, episode_kwargs)``; observations land in :attr:`arrays`.

        Returns:
            The slots whose worker was lost on the way (their episodes did not start).
        """
        per: dict[int, list] = {}
        for slot, ep in items:
            per.setdefault(self.worker_of[slot], []).append((int(slot), ep))
        _, lost = self._run("reset", {w: {"items": it} for w, it in per.items()})
        return {s for w in lost for s in self.slots_of[w]}

    def chunk(self, items: list[tuple[int, np.ndarray]]) -> tuple[dict[int, tuple[float, int, bool, bool]], set[int]]:
        """Execute one action chunk ``[C, act_dim]`` float per ``(slot, actions)``.

        Returns:
            ``({slot: (reward_sum, steps, success, done)}, lost_slots)``; lost slots are all slots of a worker that
            died (their episodes are gone, including slots that were not in ``items``).
        """
        per: dict[int, list] = {}
        for slot, act in items:
            per.setdefault(self.worker_of[slot], []).append((int(slot), act))
        replies, lost = self._run("chunk", {w: {"items": it} for w, it in per.items()})
        out = {}
        for rows in replies.values():
            for slot, reward, steps, success, done in rows:
                out[slot] = (reward, steps, success, done)
                self.sim_steps += steps
        return out, {s for w in lost for s in self.slots_of[w]}

    def call(self, slot: int, method: str, **kwargs: Any) -> Any:
        """Run ``method(**kwargs)`` on one slot's simulator (tests, diagnostics).

        Raises:
            WorkerLost: the worker failed (it is replaced).
        """
        w = self.worker_of[slot]
        replies, lost = self._run("call", {w: {"slot": int(slot), "method": method, "kwargs": kwargs}})
        if lost:
            raise WorkerLost(self.failures[slot])
        return replies[w]

    def pids(self) -> list[int]:
        """PIDs of the worker processes."""
        return [p.pid for p in self._procs]

    def close(self) -> None:
        """Stop the workers and remove the private folder. Idempotent."""
        fin = getattr(self, "_finalizer", None)
        if fin is not None:
            fin()
        self._procs = []
        self.arrays = {}


class PooledEnv(VectorEnv):
    """A :class:`~fastnft.envs.base.VectorEnv` whose slots live in a :class:`WorkerPool` (CPU simulators).

    Subclasses set ``self._pool`` (or leave it None for another backend: the base class's paths are used then) and
    implement :meth:`_episode` (a slot's reset arguments from its seed) and :meth:`_pool_obs` (the N observations
    from the pool's shared arrays).

    A worker lost during a reset is replaced and the reset retried (3 tries in all); the running episodes of its
    other slots are reported lost by the next :meth:`step_chunk` (``ChunkResult.lost``).
    """

    _pool: WorkerPool | None = None
    RESET_TRIES = 3

    def _episode(self, slot: int, seed: int) -> dict[str, Any]:
        raise NotImplementedError

    def _pool_obs(self) -> EnvObs:
        raise NotImplementedError

    def _pending(self) -> set[int]:
        if not hasattr(self, "_lost_pending"):
            self._lost_pending: set[int] = set()
        return self._lost_pending

    def _reset_slots(self, slots: list[int], seeds: list[int]) -> EnvObs:
        if self._pool is None:
            return super()._reset_slots(slots, seeds)
        items = [(s, self._episode(s, seed)) for s, seed in zip(slots, seeds, strict=True)]
        starting = set(slots)
        for _ in range(self.RESET_TRIES):
            lost = self._pool.reset(items)
            self._pending().update(lost - starting)
            self._pending().difference_update(starting - lost)
            items = [it for it in items if it[0] in lost]
            if not items:
                break
        else:
            s = items[0][0]
            raise RuntimeError(f"env slot {s} could not start an episode in {self.RESET_TRIES} tries (seed "
                               f"{seeds[slots.index(s)]}): {self._pool.failures.get(s, '')}")
        self.failures = dict(self._pool.failures)
        return self._pool_obs()

    def _step_chunk(self, actions: Tensor, live: Tensor) -> tuple[EnvObs, Tensor, Tensor, Tensor, Tensor] | None:
        if self._pool is None:
            return None
        n = self.num_envs
        a = actions.cpu().numpy()
        items = [(s, a[s]) for s, on in enumerate(live.tolist()) if on]
        res, lost = self._pool.chunk(items)
        lost |= self._pending()
        self._pending().clear()
        reward, steps = torch.zeros(n), torch.zeros(n, dtype=torch.long)
        success, lost_t = torch.zeros(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)
        for s, (r, k, ok, _done) in res.items():
            reward[s], steps[s], success[s] = r, k, ok
        for s in lost:
            lost_t[s], reward[s], steps[s], success[s] = True, 0.0, 0, False
        self.sim_steps = self._pool.sim_steps
        self.failures = dict(self._pool.failures)
        return self._pool_obs(), reward, steps, success, lost_t

    def worker_pids(self) -> list[int]:
        """PIDs of the simulator worker processes (for memory measurements, leak checks and kill tests)."""
        return self._pool.pids() if self._pool is not None else []
