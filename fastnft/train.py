"""π-StepNFT online fine-tuning: parse, build, train, tear down. The loop lives in :mod:`fastnft.loop.trainer`.

Launch (one process, no launcher needed; several ranks through DeepSpeed or torchrun):

    python -m fastnft.train --config configs/pickcube_stepnft.yaml
    fastnft train --config configs/pickcube_stepnft.yaml --resume
    deepspeed --num_gpus 2 --module fastnft.train --config configs/pickcube_stepnft.yaml
    torchrun --nproc_per_node 2 -m fastnft.train --config configs/bandit_stepnft.yaml

Needs the SFT policy of the config (``fastnft sft``) unless ``--init PATH`` names another policy file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fastnft.errors import friendly_errors

__all__ = ["add_train_args", "main", "run_train"]


def add_train_args(p: argparse.ArgumentParser) -> None:
    """Arguments of the ``train`` command (shared with the CLI)."""
    p.add_argument("--config", required=True, help="experiment YAML (configs/*.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.iterations=10 (repeatable)")
    p.add_argument("--init", default=None, help="policy file to start from (default: the config's SFT output)")
    p.add_argument("--resume", action="store_true", help="continue from the run directory's latest checkpoint")
    p.add_argument("--dry-run", action="store_true", help="build config, env, policy and engine, then exit")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    p.add_argument("--profile-steps", default=None, metavar="A:B",
                   help="run iterations A..B-1 between cudaProfilerStart/Stop (after warm-up; A >= 1) for "
                        "`nsys profile --capture-range=cudaProfilerApi` (profiling/README.md)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed


def run_train(args: argparse.Namespace) -> dict:
    """Build everything from ``args`` and train; returns ``{"history": [...], "run_dir": str}``."""
    import yaml

    from fastnft.config import config_to_dict, load_config
    from fastnft.devices import resolve_device
    from fastnft.engine import dist as fdist
    from fastnft.envs import make_env
    from fastnft.experiments.sft import sft_checkpoint_path
    from fastnft.loop.trainer import StepNFTTrainer
    from fastnft.policies.factory import build_flow_policy

    cfg = load_config(args.config, args.overrides)
    fdist.init_distributed(device=resolve_device(cfg.device))  # gloo for device: cpu, also on a CUDA host
    policy = None
    if cfg.policy.kind == "state_flow":  # a missing SFT file fails before the simulator starts
        policy = build_flow_policy(cfg, init=Path(args.init) if args.init else sft_checkpoint_path(cfg))
    env = make_env(cfg.env)
    try:
        if policy is None:  # pi0 is checked against the env's state width and action dim
            policy = build_flow_policy(cfg, init=None, state_dim=env.obs_dim, act_dim=env.act_dim, seed=cfg.train.seed)
        if fdist.is_main():
            Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
            (Path(cfg.run_dir) / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
        trainer = StepNFTTrainer(cfg, policy, env, resume=args.resume, progress=not args.no_progress,
                                 profile_steps=args.profile_steps)
        if args.dry_run:
            print(json.dumps({"dry_run": "ok", "run_dir": cfg.run_dir, "policy": cfg.policy.kind,
                              "obs_dim": env.obs_dim, "act_dim": policy.act_dim,
                              "parameters": sum(p.numel() for p in policy.parameters()),
                              "trainable_parameters": sum(p.numel() for p in policy.trainable_parameters()),
                              "world_size": trainer.world, "device": str(trainer.device),
                              "loss_fn": getattr(trainer.loss_fn, "__module__", "?"),
                              "start_iteration": trainer.start_iter}))
            return {"history": [], "run_dir": cfg.run_dir}
        history = trainer.train()
        return {"history": history, "run_dir": cfg.run_dir}
    finally:
        env.close()


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m fastnft.train`` / ``deepspeed --module fastnft.train``."""
    p = argparse.ArgumentParser(prog="fastnft.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_args(p)
    args = p.parse_args(argv)
    from fastnft.engine import dist as fdist

    with friendly_errors():
        out = run_train(args)
    h = out["history"]
    if h and fdist.is_main():
        print(f"final held-out success {h[-1]['success_rate']:.3f} (start {h[0]['success_rate']:.3f}), "
              f"run dir {out['run_dir']}")
    fdist.shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
