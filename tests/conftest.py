"""Fixtures shared by several test modules (session scope: built once per pytest run).

``bandit_sft``: the SFT start of the bandit algorithm tests (tests/test_bandit_stepnft.py and
tests/test_bandit_grpo.py train StepNFT and Flow-GRPO from the same start; one SFT instead of one per module).

``torch_threads(n)``: torch's intra-op thread count inside a block, restored after it. The bandit fixtures train
with ONE thread: on this project's 2-core machines two threads were as fast as one when idle (100 SFT steps: 3.8 s
vs 3.4 s) and 5-13x slower when the machine was shared (22-112 s vs 5-9 s, same run, alternating; load average
4-6, 2026-12-08), the likely reason these fixtures once took 840-860 s of setup beside a main job.
"""

from __future__ import annotations

import dataclasses

import pytest
from bandit_helpers import BANDIT_SFT_OVERRIDES, BANDIT_THREADS, torch_threads

from fastnft.config import ExperimentConfig, load_config


def bandit_sft_config() -> ExperimentConfig:
    """configs/bandit_stepnft.yaml with the shared SFT overrides."""
    return load_config("configs/bandit_stepnft.yaml", BANDIT_SFT_OVERRIDES)


@pytest.fixture(scope="session")
def bandit_sft():
    """``f(cfg) -> export blob`` of the SFT policy shared by the bandit modules.

    ``cfg``'s ``policy`` and ``sft`` sections (and the bandit task) must equal those of :func:`bandit_sft_config`:
    a module that changes them gets an error instead of a silently different start.
    """
    from fastnft.envs.bandit import bandit_demo_dataset
    from fastnft.experiments.sft import build_policy, train_sft

    base = bandit_sft_config()
    with torch_threads(BANDIT_THREADS):  # as the bandit modules train (the start depends on the thread count)
        data = bandit_demo_dataset(base.sft.num_demos, base.policy.horizon, seed=0)
        policy = build_policy(data, base.policy)
        train_sft(policy, data, base.sft, progress=False)
    blob = policy.export()

    def get(cfg: ExperimentConfig):
        for sec in ("policy", "sft"):
            mine, shared = dataclasses.asdict(getattr(cfg, sec)), dataclasses.asdict(getattr(base, sec))
            if mine != shared:
                raise AssertionError(f"bandit_sft is shared: {sec} differs from tests/conftest.py's "
                                     f"{BANDIT_SFT_OVERRIDES} ({mine} != {shared}); build your own start instead")
        if cfg.env.task != base.env.task:
            raise AssertionError(f"bandit_sft is the {base.env.task} start, not {cfg.env.task}")
        return blob

    return get
