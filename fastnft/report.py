"""Statistics and report helpers: confidence intervals of success rates and their differences, tables, plots.

Plain functions of numbers and lists (no fastnft imports), shared by evaluation, the pipeline report and the grid
summary.

- :func:`wilson_interval`: 95 % Wilson score interval of one success rate;
- :func:`diff_interval`: difference of two independent success rates (Newcombe, Wilson-based);
- :func:`paired_diff_interval`: mean per-episode difference of two evaluations on the same episodes;
- :func:`mean_interval` / :func:`t_quantile`: Student-t interval of a mean over runs;
- :func:`format_table`, :func:`plot_success_curves`: the Markdown table and the success-curve plot of a report.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "diff_interval",
    "format_table",
    "mean_interval",
    "paired_diff_interval",
    "plot_success_curves",
    "t_quantile",
    "wilson_interval",
]


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a success rate (robust near 0 and 1)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, c - h), min(1.0, c + h)


def diff_interval(s1: int, n1: int, s2: int, n2: int, z: float = 1.96) -> tuple[float, float, float]:
    """Difference of two success rates ``p2 - p1`` with a 95 % Newcombe (Wilson-based) interval.

    Returns:
        ``(difference, low, high)``.
    """
    p1, p2 = s1 / max(n1, 1), s2 / max(n2, 1)
    l1, u1 = wilson_interval(s1, n1, z)
    l2, u2 = wilson_interval(s2, n2, z)
    d = p2 - p1
    lo = d - ((p2 - l2) ** 2 + (u1 - p1) ** 2) ** 0.5
    hi = d + ((u2 - p2) ** 2 + (p1 - l1) ** 2) ** 0.5
    return d, lo, hi


def paired_diff_interval(before: list[float], after: list[float], z: float = 1.96) -> tuple[float, float, float]:
    """Mean per-episode difference ``after - before`` of two evaluations on the SAME episodes, with a 95 % interval.

    Both lists hold outcomes in [0, 1] in the same seed order (``evaluate_policy(...)["per_episode"]``, or their
    mean over several runs). The interval is
    the normal approximation ``mean(d) +- z * sd(d) / sqrt(n)`` of the paired differences ``d_j in {-1, 0, 1}``;
    episodes whose outcome did not change contribute no variance.

    Returns:
        ``(difference, low, high)`` as fractions.

    Raises:
        ValueError: the lists differ in length or are empty.
    """
    if len(before) != len(after) or not before:
        raise ValueError(f"paired_diff_interval needs two equally long, non-empty outcome lists, got "
                         f"{len(before)} and {len(after)}; evaluate both policies on the same seeds")
    d = torch.tensor(after, dtype=torch.float64) - torch.tensor(before, dtype=torch.float64)
    n = d.numel()
    m = float(d.mean())
    sd = float(d.std(unbiased=True)) if n > 1 else 0.0
    h = z * sd / n ** 0.5
    return m, m - h, m + h


def t_quantile(df: int) -> float:
    """Two-sided 95 % Student-t quantile."""
    from scipy.stats import t

    return float(t.ppf(0.975, df))


def mean_interval(xs: list[float]) -> dict[str, Any]:
    """Mean of ``xs`` with a two-sided 95 % Student-t interval: ``{"n", "mean", "sd", "ci95": [lo, hi], "method"}``
    (only ``n`` for no values, ``n`` and ``mean`` for one)."""
    n = len(xs)
    if n == 0:
        return {"n": 0}
    m = sum(xs) / n
    if n < 2:
        return {"n": n, "mean": m}
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1))
    h = t_quantile(n - 1) * sd / math.sqrt(n)
    return {"n": n, "mean": m, "sd": sd, "ci95": [m - h, m + h], "method": "Student t over runs"}


def format_table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    """A Markdown table of ``rows`` with ``columns = [(key, header)]``; floats get 3 decimals."""
    def fmt(v: Any) -> str:
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    head = "| " + " | ".join(h for _, h in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(fmt(r.get(k, "")) for k, _ in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def draw_success_curves(ax: Any, curves: dict[str, list[dict[str, float]]],
                        styles: dict[str, dict[str, Any]] | None = None, band_alpha: float = 0.15) -> None:
    """Draw held-out success (%) vs iteration with its 95 % band on a matplotlib ``ax``, one line per label.

    Args:
        curves: ``{label: [{"iteration", "success_rate", "ci_low", "ci_high"}, ...]}``, rates as fractions in [0, 1].
        styles: optional ``{label: matplotlib line kwargs}`` (``color``, ``ls``); the band takes the line's colour.
        band_alpha: opacity of the interval bands.
    """
    for label, hist in curves.items():
        if not hist:
            continue
        it = [h["iteration"] for h in hist]
        (line,) = ax.plot(it, [100 * h["success_rate"] for h in hist], marker="o", ms=3, label=label,
                          **(styles or {}).get(label, {}))
        ax.fill_between(it, [100 * h["ci_low"] for h in hist], [100 * h["ci_high"] for h in hist],
                        color=line.get_color(), alpha=band_alpha)
    ax.set_xlabel("iteration")
    ax.set_ylabel("held-out success rate (%)")
    ax.grid(alpha=0.3)


def plot_success_curves(curves: dict[str, list[dict[str, float]]], path: str | Path, title: str) -> Path:
    """Held-out success rate vs iteration (with 95 % intervals) for one or more runs, saved as PNG.

    Args:
        curves: ``{label: [{"iteration", "success_rate", "ci_low", "ci_high"}, ...]}``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    draw_success_curves(ax, curves)
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p)
    plt.close(fig)
    return p
