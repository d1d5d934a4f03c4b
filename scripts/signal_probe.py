"""How much label signal does one episode carry? A probe for issue 6 (no training, one batch of rollouts).

Collects E episodes with the Flow-SDE rollout policy (the SFT policy; G rollouts per initial state), then, for each
label scheme, computes one StepNFT gradient per episode ``g_e`` at ``theta = theta_old`` (where S7 is exactly the
linear REINFORCE-like term) and estimates

    signal  S^2   = |E g_e|^2           (unbiased: (|sum g|^2 - sum |g_e|^2) / (E (E - 1)))
    noise   var   = E |g_e - mean g|^2
    episodes for a reliable direction   E* = var / S^2   (a gradient over E* episodes has cosine ~0.7 with the
                                                          true one; two halves of 2 E* episodes agree at cos ~0.5)

Usage (writes the JSON that RESULTS.md cites):
    python scripts/signal_probe.py --config configs/pickcube_stepnft.yaml --episodes 256 --out results/signal_probe.json
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from fastnft.config import load_config
from fastnft.envs import make_env
from fastnft.experiments.sft import sft_checkpoint_path
from fastnft.kernels import get_sde_step
from fastnft.loop.rollout import episode_labels, run_episodes
from fastnft.loop.update import buffer_loss
from fastnft.nft import stepnft_loss
from fastnft.policies.io import load_policy
from fastnft.sde import flow_sde_schedule


def per_episode_grads(policy, buf, sch, nft, C, ep_labels):
    params = [p for p in policy.parameters() if p.requires_grad]
    grads = []
    for e in torch.unique(buf.episode).tolist():
        rows = (buf.episode == e).nonzero().squeeze(1)
        mb = buf.index(rows)
        mb.y = torch.full_like(mb.y, float(ep_labels[e]))
        loss = buffer_loss(policy, mb, sch, nft, C, stepnft_loss) * len(rows)  # sum over the episode's rows
        g = torch.autograd.grad(loss, params, allow_unused=True)
        grads.append(torch.cat([(torch.zeros_like(p) if x is None else x).reshape(-1) for p, x in zip(params, g)]))
    return torch.stack(grads)


def snr(G: torch.Tensor) -> dict[str, float]:
    E = G.shape[0]
    tot = G.sum(0)
    sq = G.pow(2).sum()
    s2 = float((tot.pow(2).sum() - sq) / (E * (E - 1)))
    var = float((G - G.mean(0)).pow(2).sum(1).mean())
    return {"signal_sq": s2, "noise_var": var, "snr_per_episode": s2 / var,
            "episodes_for_reliable_direction": var / s2 if s2 > 0 else float("inf")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/pickcube_stepnft.yaml")
    ap.add_argument("--episodes", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="results/signal_probe.json")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    cfg = load_config(args.config, args.overrides)
    torch.manual_seed(args.seed)
    policy, _ = load_policy(sft_checkpoint_path(cfg), cfg)
    env = make_env(cfg.env)
    G = cfg.train.group_size
    seeds = [cfg.env.train_seed + 900_000 + j // G for j in range(args.episodes)]  # unused by any training run
    sch = flow_sde_schedule(cfg.policy.num_steps, cfg.nft.noise_level).to(dtype=torch.float32)
    nft = dataclasses.replace(cfg.nft, steps_per_call=cfg.policy.num_steps)
    t0 = time.time()
    try:
        buf, st = run_episodes(policy, env, sch, seeds, stochastic=True, record=True,
                               generator=torch.Generator().manual_seed(args.seed), nft=nft,
                               step_fn=get_sde_step("torch", "cpu"), group_size=G)
    finally:
        env.close()
    roll_s = time.time() - t0
    succ, score = st.episode_success, st.episode_score
    schemes = {
        "success, y = 2s - 1 (paper)": episode_labels(succ, "none"),
        "success, group baseline (default recipe)": episode_labels(succ, "group", G),
        "dense score, y = 2r - 1": 2 * score - 1,
        "dense score, group baseline": episode_labels(score, "group", G),
    }
    # one random solver step per call (S3) instead of all K: keep one row of each (episode, call)
    call_key = buf.episode * 10_000 + torch.unique(buf.x0[:, 0, 0], return_inverse=True)[1]
    g = torch.Generator().manual_seed(1)
    order = torch.randperm(len(buf), generator=g)
    _, first = torch.unique(call_key[order], return_inverse=True)
    keep = torch.zeros(len(buf), dtype=torch.bool)
    seen = set()
    for idx, k in zip(order.tolist(), first.tolist()):
        if k not in seen:
            seen.add(k)
            keep[idx] = True
    one_step = buf.index(keep.nonzero().squeeze(1))
    out = {"config": args.config, "overrides": args.overrides, "episodes": args.episodes, "group_size": G,
           "success_rate": float(succ.float().mean()), "mean_dense_score": float(score.mean()),
           "rows_all_k": len(buf), "rows_one_step": len(one_step), "rollout_s": roll_s, "schemes": {}}
    for name, lab in schemes.items():
        out["schemes"][name] = {"all K steps": snr(per_episode_grads(policy, buf, sch, cfg.nft, policy.n_action_steps, lab))}
        print(name, out["schemes"][name], flush=True)
    for name in ("success, group baseline (default recipe)", "dense score, group baseline"):
        out["schemes"][name]["one random step per call"] = snr(
            per_episode_grads(policy, one_step, sch, cfg.nft, policy.n_action_steps, schemes[name]))
        print(name, "one step", out["schemes"][name]["one random step per call"], flush=True)
    from fastnft.atomic import write_json_atomic

    write_json_atomic(args.out, out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
