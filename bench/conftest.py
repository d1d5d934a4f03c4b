"""Fixtures of the kernel benchmarks (``pytest bench/``): device, measured copy bandwidth, size selection."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from _bench_utils import copy_bandwidth as _copy_bandwidth
from _bench_utils import device_name


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--kernel-sizes", default="auto", choices=["auto", "cpu", "full"],
                     help="size sweep: full (GPU default), cpu (the reduced CPU set, CPU default), auto")


def pytest_configure(config: pytest.Config) -> None:
    import torch._dynamo

    # one compiled graph per (size, pass) in one run: lift dynamo's per-function cache limit
    for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                 "accumulated_recompile_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 256))


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def full_sweep(request: pytest.FixtureRequest, device: torch.device) -> bool:
    choice = request.config.getoption("--kernel-sizes")
    return choice == "full" or (choice == "auto" and device.type == "cuda")


@pytest.fixture(scope="session")
def copy_bw(device: torch.device) -> dict:
    """The device's measured copy bandwidth (GB/s), measured once per run and stored with every result."""
    return {"device": device_name(device), "copy_gbps": _copy_bandwidth(device)}
