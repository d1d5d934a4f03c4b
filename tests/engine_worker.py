"""Worker for tests/test_engine_distributed.py: a tiny MLP trained with ActorEngine on fixed data.

Run as one plain process (``python tests/engine_worker.py --out DIR``) or several
(``python -m torch.distributed.run --nproc_per_node 2 tests/engine_worker.py --out DIR``). Every step uses a
global batch of ``GLOBAL_BATCH`` rows; rank r takes the r-th contiguous slice, so the rank-averaged gradient is
the full-batch gradient and the trajectory must equal :func:`reference_trajectory` (plain torch AdamW).
Writes ``DIR/rank<r>.json`` with losses, grad norms, final weights and EMA weights.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch import nn

GLOBAL_BATCH = 8
STEPS = 4
LR = 1e-2
GRAD_CLIP = 0.5  # small enough that clipping is active in the first steps
EMA_DECAY = 0.6


class TinyPolicy(nn.Module):
    """Odd-sized MLP ``[B, 5] -> [B, 3]`` with a frozen output mixer (must stay untouched)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
        self.frozen = nn.Linear(3, 3)
        self.frozen.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.frozen(self.net(x))


def make_model() -> TinyPolicy:
    torch.manual_seed(0)
    return TinyPolicy()


def make_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(STEPS, GLOBAL_BATCH, 5, generator=g), torch.randn(STEPS, GLOBAL_BATCH, 3, generator=g)


def configs():
    from fastnft.config import EngineConfig, TrainConfig

    return TrainConfig(lr=LR, grad_clip=GRAD_CLIP), EngineConfig


def reference_trajectory() -> dict:
    """Plain-torch oracle: full-batch AdamW (train.* betas/eps/wd) with clip_grad_norm_, no DeepSpeed."""
    tcfg, _ = configs()
    model = make_model()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=tcfg.lr, betas=tcfg.betas, eps=tcfg.eps, weight_decay=tcfg.weight_decay)
    X, Y = make_data()
    losses, norms = [], []
    ema = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for s in range(STEPS):
        loss = ((model(X[s]) - Y[s]) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(params, tcfg.grad_clip)))
        opt.step()
        losses.append(float(loss.detach()))
        for n, p in model.named_parameters():
            if p.requires_grad:
                ema[n] = EMA_DECAY * ema[n] + (1 - EMA_DECAY) * p.detach()
    return {"losses": losses, "grad_norms": norms,
            "params": {n: p.detach().flatten().tolist() for n, p in model.named_parameters()},
            "ema": {n: t.flatten().tolist() for n, t in ema.items()}}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--stage", type=int, default=0)
    ap.add_argument("--save-at", type=int, default=-1, help="write the engine+EMA state after this many steps")
    ap.add_argument("--resume", default="", help="load the engine+EMA state from this file and continue")
    args = ap.parse_args(argv)

    from fastnft.engine import EMA, ActorEngine
    from fastnft.engine import dist as fdist

    tcfg, ecfg_cls = configs()
    model = make_model()
    ema = EMA(model)
    # CPU + gloo on every host: the oracle is a CPU trajectory, and a 1-GPU machine cannot give 2 ranks a GPU each.
    actor = ActorEngine(model, tcfg, ecfg_cls(zero_stage=args.stage), device="cpu")
    r, w = actor.rank, actor.world_size
    assert GLOBAL_BATCH % w == 0
    X, Y = make_data()
    start = 0
    if args.resume:
        state = torch.load(args.resume, weights_only=True)
        actor.load_checkpoint_state(state["actor"])
        ema.load_state_dict(state["ema"])
        start = actor.global_steps
    out: dict = {"rank": r, "world_size": w, "start": start, "losses": [], "grad_norms": [], "lrs": []}
    for s in range(start, STEPS):
        xs, ys = (t.chunk(w)[r].to(actor.device) for t in (X[s], Y[s]))
        loss = ((actor.module(xs) - ys) ** 2).mean()
        info = actor.train_step(loss)
        out["losses"].append(float(fdist.all_reduce_mean(loss.detach().clone())))
        out["grad_norms"].append(info["grad_norm"])
        out["lrs"].append(info["lr"])
        ema.update(actor.module, EMA_DECAY)
        if s + 1 == args.save_at:
            state = {"actor": actor.state_dict_for_checkpoint(), "ema": ema.state_dict()}
            if actor.is_main:
                torch.save(state, Path(args.out) / "state.pt")
    full = actor.state_dict_for_checkpoint()
    out["params"] = {n: t.flatten().tolist() for n, t in full["params"].items()}
    out["frozen"] = {n: p.detach().flatten().tolist() for n, p in ema.module.named_parameters()
                     if n.startswith("frozen")}
    out["ema"] = {n: t.flatten().tolist() for n, t in ema.state_dict()["params"].items()}
    out["global_steps"] = actor.global_steps
    (Path(args.out) / f"rank{r}.json").write_text(json.dumps(out))
    fdist.shutdown_distributed()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
