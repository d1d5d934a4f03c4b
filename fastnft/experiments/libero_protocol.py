"""The LIBERO evaluation protocol: every (task, init state) pair of a suite once, success per task and per suite
with 95 % Wilson intervals, in the paper's table layout (one row per policy; Spatial, Object, Goal, Long, Avg.).

    fastnft eval --config configs/libero_object_pi0.yaml --protocol libero --run runs/libero_object_pi0
    fastnft eval --config configs/libero_object_pi0.yaml --protocol libero --suites all --policy CKPT_DIR

An episode is LIBERO's protocol episode (:mod:`fastnft.envs.libero`): the pair's init state, 15 settling no-op
steps, then at most the suite's episode limit of env steps; success is the BDDL goal check. The policy samples
with deterministic Euler ODE steps (SPEC S2c), as every fastnft evaluation (:func:`fastnft.loop.evaluate.evaluate_policy`).

Files in the output folder (default ``<run_dir>/libero_eval``):

* ``episodes.jsonl``: one line per finished episode ``{"suite", "task", "state", "success", "steps"}``, appended
  and fsynced after each round of ``env.num_envs`` episodes. A killed evaluation resumes where it stopped: finished
  pairs are skipped, a torn last line (a kill mid-write) is cut off, and a pair is counted once even if listed
  twice. ``meta.json`` pins what the episodes were run with (policy, suites' limits, denoising steps, image size);
  resuming with other settings is refused.
* ``libero_results.json`` and ``libero_results.md``: per-task and per-suite successes, rates and 95 % intervals,
  with the MuJoCo, robosuite and LIBERO versions (rendering differs between MuJoCo majors) and the manifest's
  upstream commit. Rewritten atomically after each round, so they always describe the episodes on disk.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from fastnft.atomic import atomic_write, write_json_atomic
from fastnft.envs.libero_suites import EPISODE_LIMITS, NUM_STATES, NUM_TASKS, SUITE_TITLES, SUITES
from fastnft.report import wilson_interval

__all__ = ["EpisodeLog", "libero_eval", "parse_suites", "run_libero_protocol", "run_protocol_command", "summarize"]

RunRound = Callable[[str, list[tuple[int, int]]], list[tuple[bool, int]]]
"""``run_round(suite, pairs) -> [(success, steps)]``: run one round of at most ``num_envs`` episodes."""


def parse_suites(text: str | None, default: str) -> list[str]:
    """``all`` -> the four suites; ``libero_object,libero_goal`` -> those; ``None`` -> ``[default]``.

    Raises:
        ValueError: an unknown suite (lists the valid ones).
    """
    if text is None:
        return [default]
    names = list(SUITES) if text == "all" else [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in names if s not in SUITES]
    if bad or not names:
        raise ValueError(f"--suites: unknown LIBERO suite(s) {bad}; use 'all' or a comma list of {', '.join(SUITES)}")
    return names


def parse_indices(text: str | None, n: int, flag: str) -> list[int]:
    """``"0,1"`` -> ``[0, 1]``; ``None`` -> ``range(n)``.

    Raises:
        ValueError: not integers in ``[0, n)`` (names the flag).
    """
    if text is None:
        return list(range(n))
    try:
        out = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError as e:
        raise ValueError(f"{flag} must be comma-separated integers, got {text!r}") from e
    if not out or out[0] < 0 or out[-1] >= n:
        raise ValueError(f"{flag} must list integers in [0, {n}), got {text!r}")
    return out


class EpisodeLog:
    """Append-only per-episode results (``episodes.jsonl``), safe against kills.

    Each round is appended with one ``write`` and an ``fsync``; on open, a last line without its newline (torn by a
    kill) is cut off, and lines that do not parse are ignored. :meth:`results` keeps the first record per pair.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            data = self.path.read_bytes()
            if data and not data.endswith(b"\n"):
                with open(self.path, "r+b") as f:
                    f.truncate(data.rfind(b"\n") + 1)
                    os.fsync(f.fileno())

    def results(self) -> dict[tuple[str, int, int], dict[str, Any]]:
        """``{(suite, task, state): record}``, first record per pair."""
        out: dict[tuple[str, int, int], dict[str, Any]] = {}
        if not self.path.exists():
            return out
        for line in self.path.read_text().splitlines():
            try:
                r = json.loads(line)
                key = (str(r["suite"]), int(r["task"]), int(r["state"]))
                bool(r["success"])
            except (ValueError, KeyError, TypeError):
                continue
            out.setdefault(key, r)
        return out

    def append(self, records: list[dict[str, Any]]) -> None:
        """Append ``records`` (one JSON line each) with one write, then fsync."""
        blob = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records).encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, blob)
            os.fsync(fd)
        finally:
            os.close(fd)


def _versions() -> dict[str, str]:
    out = {}
    for dist in ("mujoco", "robosuite", "rlinf-libero", "bddl", "numpy", "torch"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    from fastnft.envs.libero_assets import MANIFEST

    head = MANIFEST.read_text().splitlines()[0]
    out["libero_upstream"] = head[head.find("(") + 1:head.find(")")] if "(" in head else head
    return out


def summarize(results: dict[tuple[str, int, int], dict[str, Any]], suites: Sequence[str],
              tasks: Sequence[int], states: Sequence[int], name: str = "policy",
              meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """Per-task and per-suite success with 95 % Wilson intervals over the finished episodes of the plan.

    Returns:
        ``{"policy", "suites": {suite: {"successes", "episodes", "planned", "success_rate", "ci95", "tasks":
        [{task, name, instruction?, successes, episodes, success_rate, ci95}]}}, "average": mean of the suites'
        rates (the paper's Avg.), "complete": every planned episode finished, "versions", "meta"}``.
    """
    out: dict[str, Any] = {"policy": name, "suites": {}, "versions": _versions(), "meta": meta or {}}
    rates = []
    for suite in suites:
        rows, s_tot, n_tot = [], 0, 0
        for t in tasks:
            recs = [results[(suite, t, k)] for k in states if (suite, t, k) in results]
            s, n = sum(bool(r["success"]) for r in recs), len(recs)
            lo, hi = wilson_interval(s, n)
            rows.append({"task": t, "successes": s, "episodes": n, "success_rate": s / n if n else None,
                         "ci95": [lo, hi]})
            s_tot, n_tot = s_tot + s, n_tot + n
        lo, hi = wilson_interval(s_tot, n_tot)
        rate = s_tot / n_tot if n_tot else None
        out["suites"][suite] = {"successes": s_tot, "episodes": n_tot, "planned": len(tasks) * len(states),
                                "success_rate": rate, "ci95": [lo, hi], "tasks": rows}
        if rate is not None:
            rates.append(rate)
    out["average"] = sum(rates) / len(rates) if len(rates) == len(suites) and rates else None
    out["complete"] = all(v["episodes"] == v["planned"] for v in out["suites"].values())
    return out


def _pct(rate: float | None, ci: Sequence[float] | None = None) -> str:
    if rate is None:
        return "–"
    return f"{100 * rate:.1f}" + (f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci is not None else "")


def to_markdown(summary: dict[str, Any], instructions: dict[str, list[str]] | None = None) -> str:
    """The paper's table (success rate in %, 95 % interval in brackets) and one per-task table per suite."""
    suites = list(summary["suites"])
    head = "| Policy | " + " | ".join(SUITE_TITLES[s] for s in suites) + " | Avg. |"
    caption = "Success rate (%) with 95 % Wilson interval; episodes per suite in the per-task tables."
    lines = ["# LIBERO evaluation", "", caption, "", head, "|" + "---|" * (len(suites) + 2)]
    cells = [_pct(summary["suites"][s]["success_rate"], summary["suites"][s]["ci95"]) for s in suites]
    lines.append(f"| {summary['policy']} | " + " | ".join(cells) + f" | {_pct(summary['average'])} |")
    if not summary["complete"]:
        lines += ["", "**Incomplete**: " + ", ".join(f"{SUITE_TITLES[s]} {v['episodes']}/{v['planned']}"
                                                      for s, v in summary["suites"].items()) + " episodes."]
    for s in suites:
        v = summary["suites"][s]
        lines += ["", f"## {SUITE_TITLES[s]} ({s}): {v['successes']}/{v['episodes']} episodes", "",
                  "| Task | Instruction | Successes | Success (%) [95 % CI] |", "|---|---|---|---|"]
        for r in v["tasks"]:
            text = (instructions or {}).get(s, [""] * NUM_TASKS)[r["task"]]
            lines.append(f"| {r['task']} | {text} | {r['successes']}/{r['episodes']} | "
                         f"{_pct(r['success_rate'], r['ci95'])} |")
    ver = summary["versions"]
    lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in ver.items()) + "."]
    return "\n".join(lines) + "\n"


def _match_workers(pairs: list[tuple[int, int]], worker_tasks: list[int]) -> list[int]:
    """An order of ``pairs`` that gives each worker a pair of the task its sim already holds where possible (a new
    task rebuilds the sim: a hard reset, about twice a soft one's cost). Returns indices into ``pairs``."""
    free = list(range(len(pairs)))
    slots: list[int | None] = [None] * len(pairs)
    for i, task in enumerate(worker_tasks[:len(pairs)]):
        j = next((j for j in free if pairs[j][0] == task), None)
        if j is not None:
            slots[i] = j
            free.remove(j)
    return [s if s is not None else free.pop(0) for s in slots]


def run_libero_protocol(run_round: RunRound, out_dir: str | os.PathLike, suites: Sequence[str], *,
                        tasks: Sequence[int] | None = None, states: Sequence[int] | None = None,
                        num_envs: int = 1, name: str = "policy", meta: dict[str, Any] | None = None,
                        instructions: dict[str, list[str]] | None = None,
                        progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the episodes of the plan that ``out_dir`` does not hold yet, in rounds of ``num_envs``, and write the
    results (see the module docstring). Returns :func:`summarize`'s dict.

    Args:
        run_round: runs one round of ``(task, state)`` pairs of one suite, returns ``[(success, steps)]``.
        out_dir: output folder (``episodes.jsonl``, ``meta.json``, ``libero_results.{json,md}``).
        suites, tasks, states: the plan (default: all 10 tasks x 50 states of each suite).
        meta: what the episodes depend on; must equal the stored ``meta.json`` when resuming.

    Raises:
        ValueError: ``out_dir`` holds episodes run with other settings (names both; use another folder).
    """
    out = Path(out_dir)
    tasks = list(range(NUM_TASKS)) if tasks is None else list(tasks)
    states = list(range(NUM_STATES)) if states is None else list(states)
    meta = dict(meta or {})
    meta_path = out / "meta.json"
    if meta_path.exists():
        old = json.loads(meta_path.read_text())
        if old != json.loads(json.dumps(meta)):
            raise ValueError(f"{out} holds LIBERO episodes run with other settings ({old}, now {meta}); resume with "
                             "the same settings, or pass another --out folder")
    else:
        write_json_atomic(meta_path, meta)
    log = EpisodeLog(out / "episodes.jsonl")

    def write() -> dict[str, Any]:
        summary = summarize(log.results(), suites, tasks, states, name, meta)
        write_json_atomic(out / "libero_results.json", summary)
        atomic_write(out / "libero_results.md", lambda f: f.write(to_markdown(summary, instructions)), text=True)
        return summary

    for suite in suites:
        done = log.results()
        # state-major: each round mixes the tasks alike, so workers keep their task's sim from round to round
        todo = [(t, k) for k in states for t in tasks if (suite, t, k) not in done]
        for i in range(0, len(todo), num_envs):
            pairs = todo[i:i + num_envs]
            res = run_round(suite, pairs)
            log.append([{"suite": suite, "task": t, "state": k, "success": bool(s), "steps": int(n)}
                        for (t, k), (s, n) in zip(pairs, res, strict=True)])
            summary = write()
            if progress is not None:
                v = summary["suites"][suite]
                progress(f"{suite}: {v['episodes']}/{v['planned']} episodes, {v['successes']} successes")
    return write()


def libero_eval(cfg: Any, policy: Any, *, suites: Sequence[str], out_dir: str | os.PathLike,
                tasks: Sequence[int] | None = None, states: Sequence[int] | None = None, device: Any = "cpu",
                name: str = "policy", policy_source: str = "", progress: Callable[[str], None] | None = None
                ) -> dict[str, Any]:
    """Run the protocol for ``policy`` with ``cfg``'s env settings (cameras, image size, slots, envs) on each suite.

    The suite named by ``cfg.env.task`` keeps ``cfg.env.max_episode_steps``; other suites use their own limits.
    Each round samples as :func:`fastnft.loop.evaluate.evaluate_policy` does (Euler ODE, noise generator seeded by the
    round's first episode seed), so a round of the same seeds gives the same outcomes.

    Raises:
        ValueError: as :func:`run_libero_protocol`; fastnft.envs.libero_assets.LiberoAssetError: LIBERO files.
    """
    from fastnft.devices import make_generator
    from fastnft.envs.libero import LiberoVectorEnv
    from fastnft.envs.libero_suites import episode_for_seed, seed_for_episode, suite_tasks
    from fastnft.loop.rollout import run_episodes
    from fastnft.sde import flow_sde_schedule

    sch = flow_sde_schedule(cfg.policy.num_steps, 0.0)
    policy.eval()

    envs: dict[str, LiberoVectorEnv] = {}
    limits = {s: (cfg.env.max_episode_steps if s == cfg.env.task else EPISODE_LIMITS[s]) for s in suites}

    def run_round(suite: str, pairs: list[tuple[int, int]]) -> list[tuple[bool, int]]:
        if suite not in envs:
            for e in envs.values():  # one suite's workers at a time
                e.close()
            envs.clear()
            env_cfg = dataclasses.replace(cfg.env, task=suite, max_episode_steps=limits[suite],
                                          libero_split="shared")
            envs[suite] = LiberoVectorEnv(env_cfg, num_envs=cfg.env.num_envs)
        env = envs[suite]
        order = _match_workers(pairs, [t for t, _ in env.episodes])
        pairs = [pairs[j] for j in order]
        seeds = [seed_for_episode(t, k, cfg.env.eval_seed) for t, k in pairs]
        assert [episode_for_seed(s) for s in seeds] == pairs
        # each episode's noise is keyed by this generator and its place in the round; per-episode steps kept here
        _, st = run_episodes(policy, env, sch, seeds, stochastic=False, record=False,
                             generator=make_generator(device, seeds[0]), device=device)
        res = list(zip(st.episode_success.tolist(), st.episode_steps.tolist(), strict=True))
        back = [None] * len(order)
        for pos, j in enumerate(order):
            back[j] = (bool(res[pos][0]), int(res[pos][1]))
        return back  # type: ignore[return-value]

    meta = {"policy": policy_source, "num_steps": cfg.policy.num_steps, "image_size": cfg.env.image_size,
            "cameras": list(cfg.env.cameras), "camera_slots": dict(cfg.env.camera_slots), "limits": limits,
            "delta_actions": getattr(cfg.env, "delta_actions", False), "eval_seed": cfg.env.eval_seed}
    instructions = {s: [t.instruction for t in suite_tasks(s)] for s in suites}
    try:
        return run_libero_protocol(run_round, out_dir, suites, tasks=tasks, states=states,
                                   num_envs=cfg.env.num_envs, name=name, meta=meta, instructions=instructions,
                                   progress=progress)
    finally:
        for e in envs.values():
            e.close()


def run_protocol_command(args: Any, cfg: Any, load_policy: Callable[[], Any], device: Any) -> dict[str, Any]:
    """``fastnft eval --protocol libero``: the plan from ``--suites / --tasks / --states``, the results in ``--out``
    (default ``<run_dir>/libero_eval``); prints the paper table.

    Raises:
        ValueError: ``env.task`` is not a LIBERO suite, or bad ``--suites / --tasks / --states``.
    """
    import sys

    if cfg.env.task not in SUITES:
        raise ValueError(f"--protocol libero needs a LIBERO config (env.task one of {', '.join(SUITES)}), got "
                         f"env.task={cfg.env.task!r}")
    suites = parse_suites(args.suites, cfg.env.task)
    tasks = parse_indices(args.tasks, NUM_TASKS, "--tasks")
    states = parse_indices(args.states, NUM_STATES, "--states")
    out = Path(args.out) if args.out else Path(args.run or cfg.run_dir) / "libero_eval"
    source = str(args.policy or (Path(args.run or cfg.run_dir) / "policy_final"))
    policy = load_policy()
    summary = libero_eval(cfg, policy, suites=suites, out_dir=out, tasks=tasks, states=states, device=device,
                          name=cfg.name, policy_source=source,
                          progress=None if args.no_progress else (lambda m: print(m, file=sys.stderr)))
    print((out / "libero_results.md").read_text())
    return summary
