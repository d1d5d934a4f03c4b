"""Markdown table of a kernel benchmark run: ``python bench/report.py bench/results.json``.

One row per (op, pass, size); per provider the time (ms), achieved GB/s, its fraction of the measured copy
bandwidth, and the speed-up of ``triton``/``compile`` over the eager ``torch`` reference.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict


def table(path: str) -> str:
    with open(path) as f:
        data = json.load(f)
    rows: dict[tuple, dict[str, dict]] = defaultdict(dict)
    info0 = None
    for b in data["benchmarks"]:
        e = b["extra_info"]
        if "time_ms" not in e:
            continue
        info0 = info0 or e
        key = (e["op"], e["mode"], tuple(e["size"]), e["dtype"])
        rows[key][e["provider"]] = e
    providers = ["triton", "torch", "compile"]
    present = [p for p in providers if any(p in r for r in rows.values())]
    out = []
    if info0:
        out.append(f"Device: **{info0['device']}**, measured copy bandwidth "
                   f"**{info0['copy_gbps']:.1f} GB/s** (timer: {info0['timer']}).\n")
    head = "| op | pass | N x C x D | " + " | ".join(
        f"{p} ms | {p} GB/s (% copy)" for p in present) + " | " + " | ".join(
        f"{p} vs torch" for p in present if p != "torch") + " |"
    out.append(head)
    out.append("|" + "---|" * (3 + 2 * len(present) + len([p for p in present if p != "torch"])))
    for (op, mode, size, _dtype), r in sorted(rows.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2][0] *
                                                                             kv[0][2][1])):
        cells = [op, mode, "x".join(map(str, size))]
        for p in present:
            if p in r:
                e = r[p]
                cells += [f"{e['time_ms']:.4g}", f"{e['gbps']:.3g} ({100 * e['frac_copy_bw']:.0f} %)"]
            else:
                cells += ["-", "-"]
        for p in present:
            if p == "torch":
                continue
            ok = p in r and "torch" in r
            cells.append(f"{r['torch']['time_ms'] / r[p]['time_ms']:.2f}x" if ok else "-")
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


if __name__ == "__main__":
    print(table(sys.argv[1] if len(sys.argv) > 1 else "bench/results.json"))
