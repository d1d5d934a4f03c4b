"""Worker for tests/test_pi0_zero3.py: the tiny pi0 under ``engine.zero_stage`` on CPU (gloo, one rank).

Builds :class:`~fastnft.loop.trainer.StepNFTTrainer` on a frame env (no simulator), runs one iteration (EMA rollout,
update, EMA update) and an evaluation, and writes ``OUT/result.json`` with the metrics and checks that the frozen
prefix still holds full weights (EMA copy and live policy), and ``OUT/state.pt`` with the trained and EMA weights. A fresh interpreter: DeepSpeed sets up its process group and
accelerator once per process.

    python tests/pi0_zero3_worker.py --out DIR --stage 3
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--stage", type=int, default=3)
    args = ap.parse_args(argv)

    import torch
    from test_pi0_train import FrameEnv

    from fastnft.config import load_config
    from fastnft.loop.trainer import StepNFTTrainer
    from fastnft.policies.factory import build_flow_policy

    out = Path(args.out)
    cfg = load_config(REPO / "configs" / "pickcube_pi0_tiny.yaml", [
        "device=cpu", "env.cameras=[cam]", f"engine.zero_stage={args.stage}", "engine.kernels=torch", f"run_dir={out / 'run'}",
        "env.num_envs=4", "train.episodes_per_iter=4", "train.eval_episodes=4", "env.max_episode_steps=8",
        ])
    env = FrameEnv([3, 0, 5, 0], max_steps=8)
    policy = build_flow_policy(cfg, init=None, state_dim=env.obs_dim, act_dim=env.act_dim, seed=0)
    frozen = {n: p.detach().clone() for n, p in policy.named_parameters() if not p.requires_grad}
    initial = {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}
    trainer = StepNFTTrainer(cfg, policy, env, progress=False)
    metrics = trainer.iteration(0)
    ev = trainer.evaluate()
    ema_frozen = dict(trainer.ema.module.named_parameters())
    live = dict(trainer.engine.module.named_parameters())
    actor = trainer.engine.state_dict_for_checkpoint()
    ema = trainer.ema.state_dict()["params"]
    torch.save({"actor": actor["params"], "ema": ema}, out / "state.pt")
    res = {
        "loss": float(metrics["update/loss"]), "success_rate": float(ev["success_rate"]),
        "global_steps": trainer.engine.global_steps,
        # the frozen prefix keeps its full shapes and values, in the EMA copy and in the live policy
        "ema_prefix_intact": all(ema_frozen[n].shape == t.shape and torch.equal(ema_frozen[n].detach(), t)
                                 for n, t in frozen.items()),
        "live_prefix_intact": all(live[n].shape == t.shape and torch.equal(live[n].detach(), t)
                                  for n, t in frozen.items()),
        "num_frozen": len(frozen),
        "ckpt_params": len(actor["params"]),
        "max_update": max(float((actor["params"][n] - t).abs().max()) for n, t in initial.items()),
        "num_trainable": sum(p.requires_grad for p in policy.parameters()),
    }
    (out / "result.json").write_text(json.dumps(res))
    from fastnft.engine import dist as fdist

    fdist.shutdown_distributed()


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
