"""Ahead-of-time compile of the fused kernels for real GPU targets, on a machine without a GPU.

Every ``@triton.jit`` kernel of :mod:`fastnft.kernels` is compiled through its real launcher
(:func:`~fastnft.kernels.stepnft_loss.stepnft_loss` and its backward, :func:`~fastnft.kernels.sde_step.sde_step`,
:func:`~fastnft.kernels.sde_step.bind_sde_step`, :func:`~fastnft.kernels.sde_step.ode_step`), so the launch
configuration (block sizes, warps, constexpr variant flags, int32/int64 offsets, argument specialisation) is
exactly the one a GPU run would choose. Three stand-ins make that possible, each only inside :func:`aot_target`:

* **A stand-in Triton driver** reports ``GPUTarget("cuda", arch, 32)`` (and the target's shared-memory limit), so
  Triton lowers ttir -> ttgir -> llir -> ptx and runs its bundled ``ptxas`` to a cubin for ``sm_<arch>``. Its
  launcher records the launch and runs nothing; its "load" returns a dummy module.
* **CUDA-looking tensors**: a ``torch.Tensor`` subclass over CPU storage whose ``device`` reads ``cuda:0``, so the
  launchers take their GPU branches (block sizes, device checks) while Triton still reads a real ``data_ptr`` for
  its alignment specialisation.
* **A ``TorchFunctionMode``** that turns ``device="cuda"`` allocations into CPU ones and keeps every result
  CUDA-looking.

Registers, spills and stack come from ``ptxas -v`` of Triton's own compile (``knobs.nvidia.dump_ptxas_log``, read
from stdout; a fresh cache directory makes every kernel really compile); shared memory from the compiled kernel's
metadata. Nothing is launched: the numbers describe the compiled code, not a measured run.

The kernels must have been defined with ``TRITON_INTERPRET`` unset (the interpreter's kernels cannot compile), so
the test suite (whose kernel tests set it) runs this module in a child process:
``python -m fastnft.kernels.aot --arch 80 --cases ci --out result.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["ARCHS", "KernelBuild", "Recorder", "aot_target", "ci_cases", "full_cases", "ptxas_version", "run_cases"]

ARCHS = (80, 90)
"""Compute capabilities compiled for: A100 (sm_80) and H100 (sm_90a)."""

MAX_SHARED = {80: 166912, 90: 232448}
"""Shared memory per block, bytes, that the stand-in device reports (CUDA's limits for sm_80 and sm_90)."""


class _CudaLooking(torch.Tensor):
    """A CPU tensor whose ``device`` reads ``cuda:0`` (the launchers' GPU branches; Triton reads its data_ptr)."""

    @property
    def device(self) -> torch.device:  # type: ignore[override]
        return torch.device("cuda", 0)

    @property
    def is_cuda(self) -> bool:  # type: ignore[override]
        return True


def _cpu_device(dev):
    return "cpu" if dev is not None and torch.device(dev).type == "cuda" else dev


class _CudaOnCpu(TorchFunctionMode):
    """Allocations asked on ``cuda`` land on the CPU; every tensor result is CUDA-looking."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        if func in (torch.Tensor.to, torch.Tensor.cuda):
            args = tuple(_cpu_device(a) if isinstance(a, (str, torch.device)) else a for a in args)
        out = func(*args, **kwargs)
        if func is torch.Tensor.cuda:
            out = args[0]
        if isinstance(out, torch.Tensor) and not isinstance(out, _CudaLooking):
            out = out.as_subclass(_CudaLooking)
        return out


@dataclass
class KernelBuild:
    """One compiled kernel specialisation: what ptxas reports for it (compiled, not run)."""

    kernel: str
    arch: int
    case: str
    num_warps: int
    constexprs: dict
    registers: int
    spill_stores: int
    spill_loads: int
    stack_bytes: int
    shared_bytes: int


@dataclass
class Recorder:
    """What :func:`aot_target` saw: one :class:`KernelBuild` per compiled specialisation, launches per kernel."""

    arch: int
    builds: list[KernelBuild] = field(default_factory=list)
    launches: dict[str, int] = field(default_factory=dict)
    case: str = ""
    ptxas: str = ""
    log: io.StringIO = field(default_factory=io.StringIO)
    _read: int = 0

    def _take_ptxas_block(self, name: str) -> str:
        text = self.log.getvalue()
        start = text.rfind(f"Compiling entry function '{name}'")
        if start < self._read:
            raise RuntimeError(f"no ptxas log for {name} (served from a cache?); aot_target needs a fresh cache")
        end = text.find("Compiling entry function", start + 1)
        end = len(text) if end < 0 else end
        self._read = start + 1
        return text[start:end]


_REGS = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_STACK = re.compile(r"(\d+) bytes stack frame")


def _parse_ptxas(block: str) -> tuple[int, int, int, int]:
    regs = _REGS.search(block)
    spill = _SPILL.search(block)
    stack = _STACK.search(block)
    if regs is None:
        raise RuntimeError(f"cannot read the register count from the ptxas log:\n{block}")
    return (int(regs.group(1)), int(spill.group(1)) if spill else 0, int(spill.group(2)) if spill else 0,
            int(stack.group(1)) if stack else 0)


def _constexprs(src) -> dict:
    names = src.fn.arg_names
    out = {}
    for path, val in src.constants.items():
        key = names[path[0]] if isinstance(path, tuple) and len(path) == 1 else str(path)
        out[key] = val if isinstance(val, (bool, int, float, str)) else str(val)
    return out


class _StandInDriver:
    """The part of Triton's GPU driver that ``JITFunction.run`` touches, for a device that is not there."""

    _sessions = 0

    def __init__(self, rec: Recorder):
        from triton.backends.compiler import GPUTarget

        self.rec = rec
        self.target = GPUTarget("cuda", rec.arch, 32)
        _StandInDriver._sessions += 1
        self.device_id = 1000 * _StandInDriver._sessions + rec.arch
        self.utils = self

    # driver
    def get_current_device(self) -> int:
        # the key of Triton's in-memory kernel caches: one per aot_target session, so that every session
        # compiles (and measures) its kernels afresh
        return self.device_id

    def get_current_stream(self, device) -> int:
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        return torch.device("cpu")

    def launcher_cls(self, src, metadata) -> Callable[..., None]:
        name = metadata.name
        regs, st, ld, stack = _parse_ptxas(self.rec._take_ptxas_block(name))
        self.rec.builds.append(KernelBuild(
            kernel=name, arch=self.rec.arch, case=self.rec.case, num_warps=metadata.num_warps,
            constexprs=_constexprs(src), registers=regs, spill_stores=st, spill_loads=ld, stack_bytes=stack,
            shared_bytes=metadata.shared))

        def launch(*args, **kwargs) -> None:  # records, launches nothing
            self.rec.launches[name] = self.rec.launches.get(name, 0) + 1

        return launch

    # utils
    def load_binary(self, name, kernel, shared, device):
        return object(), object(), 0, 0, 1024  # module, function, n_regs, n_spills, max threads per block

    def unload_module(self, module) -> None:
        pass

    def get_device_properties(self, device) -> dict:
        return {"max_shared_mem": MAX_SHARED[self.rec.arch], "multiprocessor_count": 108, "warpSize": 32}


def ptxas_version(arch: int) -> str:
    """Version of the ptxas Triton uses for ``sm_<arch>`` (its bundled CUDA 12.9 one below sm_90, 13.x from
    sm_90: whether an older driver loads those cubins is not checked here), e.g. ``"13.4.59"``."""
    import subprocess

    from triton.backends.nvidia.compiler import get_ptxas

    out = subprocess.run([get_ptxas(arch).path, "--version"], capture_output=True, text=True, check=True).stdout
    m = re.search(r"release ([\d.]+), V([\d.]+)", out)
    return m.group(2) if m else out.strip().splitlines()[-1]


def _check_compiled_mode() -> None:
    from fastnft.kernels import _common

    if _common.INTERPRETED:
        raise RuntimeError("the fused kernels were defined under TRITON_INTERPRET=1 and cannot be compiled; run the "
                           "ahead-of-time compile in a process without TRITON_INTERPRET (python -m "
                           "fastnft.kernels.aot)")


@contextlib.contextmanager
def aot_target(arch: int) -> Iterator[Recorder]:
    """Compile (never launch) every kernel the launchers call inside the block for ``sm_<arch>``.

    Inside the block, create inputs with ``device="cuda"`` (they live on the CPU but read ``cuda:0``) and call the
    launchers as a GPU run would. Each kernel specialisation compiled is appended to the recorder's ``builds``.

    Raises:
        RuntimeError: the kernels were defined under ``TRITON_INTERPRET=1``, or ptxas printed no log for a kernel.
        triton.CompilationError, RuntimeError: the kernel does not compile for the target (the test's failure).
    """
    if arch not in MAX_SHARED:
        raise ValueError(f"arch must be one of {sorted(MAX_SHARED)}, got {arch}")
    _check_compiled_mode()
    import triton
    from triton.runtime.driver import driver

    rec = Recorder(arch=arch, ptxas=ptxas_version(arch))
    old_active = driver._active
    old_dir, old_dump = triton.knobs.cache.dir, triton.knobs.nvidia.dump_ptxas_log
    with tempfile.TemporaryDirectory(prefix="fastnft-aot-") as cache:
        triton.knobs.cache.dir = cache  # fresh: every kernel really compiles, so ptxas prints its log
        triton.knobs.nvidia.dump_ptxas_log = True
        driver.set_active(_StandInDriver(rec))
        try:
            with contextlib.redirect_stdout(rec.log), _CudaOnCpu():
                yield rec
        finally:
            driver.set_active(old_active)
            triton.knobs.cache.dir, triton.knobs.nvidia.dump_ptxas_log = old_dir, old_dump


# ---- the launch cases --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Shape:
    """One shipped policy shape: action dim ``D``, chunk ``H``, supervised steps ``C``, rollout and update sizes."""

    name: str
    D: int
    H: int
    C: int
    rollout_n: tuple[int, ...]
    micro_batch: tuple[int, ...]


SHIPPED = (
    # configs/pickcube_stepnft.yaml: PickCube pd_ee_delta_pos (4 action dims), horizon 8, n_action_steps 5,
    # 8 envs (CPU backend) up to 512 (GPU backend), micro_batch 512 (and a short last micro-batch)
    Shape("state", D=4, H=8, C=5, rollout_n=(8, 512), micro_batch=(512, 37)),
    # configs/bandit_stepnft.yaml: horizon 4, 512 envs, micro_batch 128
    Shape("bandit", D=4, H=4, C=4, rollout_n=(512,), micro_batch=(128,)),
    # pi0 / pi0.5 (openpi, lerobot): max_action_dim 32, chunk 50 executed in full; 8-64 envs, micro_batch 32
    Shape("pi0", D=32, H=50, C=50, rollout_n=(8, 64), micro_batch=(32, 5)),
)
"""The shapes the shipped configs (and a real pi0 checkpoint) send through the kernels."""


def _loss_case(shape: Shape, N: int, dtype: torch.dtype, *, mask: bool, grad: bool, **kw) -> None:
    from fastnft.kernels.stepnft_loss import stepnft_loss

    full = [torch.randn(N, shape.H, shape.D, device="cuda").to(dtype) for _ in range(4)]
    A, B, std, y = (torch.rand(N, device="cuda") for _ in range(4))
    m = (torch.rand(N, device="cuda") < 0.8) if mask else None
    vt = full[0].detach().requires_grad_(grad)
    extra = {"t": A, "x0": full[3][:, :shape.C]} if kw.get("target") == "x0" else {}
    with torch.set_grad_enabled(grad):
        loss = stepnft_loss(vt[:, :shape.C], *(u[:, :shape.C] for u in full[1:]), A, B, std, y, m, **kw, **extra)
        if grad:
            loss.backward()


def _sde_case(shape: Shape, N: int, dtype: torch.dtype) -> None:
    from fastnft.kernels.sde_step import bind_sde_step, ode_step, sde_step
    from fastnft.sde import flow_sde_schedule

    sch = flow_sde_schedule(4, 0.2).to(device="cuda", dtype=dtype)
    x = torch.randn(N, shape.H, shape.D, device="cuda").to(dtype)
    v = torch.randn(N, shape.H, shape.D, device="cuda").to(dtype)
    step = bind_sde_step(None, x)  # the sampler's path: 0-d schedule views, Philox noise
    step(x, v, sch.A[0], sch.B[0], sch.std[0])
    ode_step(x, v, float(sch.delta))  # evaluation: scalar coefficients, no noise
    sde_step(x, v, sch.A[0], sch.B[0], sch.std[0], z=torch.randn_like(x))  # explicit noise


def ci_cases() -> list[tuple[str, Callable[[], None]]]:
    """Every kernel at the shipped shapes, float32 and bfloat16: the default loss (ranking, both branches, drift
    clip, mask) with and without gradient, its backward, and the three SDE-step paths."""
    cases = []
    for dtype in (torch.float32, torch.bfloat16):
        dn = str(dtype).removeprefix("torch.")
        for s in SHIPPED:
            for n in s.micro_batch:
                cases.append((f"{s.name} loss N={n} {dn}", lambda s=s, n=n, d=dtype: _loss_case(
                    s, n, d, mask=True, grad=True)))
            cases.append((f"{s.name} loss forward-only {dn}", lambda s=s, d=dtype: _loss_case(
                s, s.micro_batch[0], d, mask=True, grad=False)))
            for n in s.rollout_n:
                cases.append((f"{s.name} sde N={n} {dn}", lambda s=s, n=n, d=dtype: _sde_case(s, n, d)))
    return cases


def full_cases() -> list[tuple[str, Callable[[], None]]]:
    """:func:`ci_cases` plus every S8 loss variant with and without mask and rollout / micro-batch sizes from 1 up
    in powers of four (the smaller block sizes the launchers pick) in float32 and bfloat16, and the default loss
    and the SDE step in float16 and float64."""
    variants = [{}, {"branches": "positive"}, {"branches": "negative"}, {"loss": "wmse"},
                {"loss": "wmse", "branches": "positive"}, {"loss": "wmse", "branches": "negative"},
                {"target": "x0"}, {"max_drift": None}]
    cases = ci_cases()
    shapes = [s for s in SHIPPED if s.name != "bandit"]  # the bandit's specialisations are the state policy's
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        dn = str(dtype).removeprefix("torch.")
        for s in shapes:
            if dtype in (torch.float16, torch.float64):
                cases.append((f"{s.name} sde N={s.rollout_n[-1]} {dn}", lambda s=s, d=dtype: _sde_case(
                    s, s.rollout_n[-1], d)))
            for kw in variants if dtype in (torch.float32, torch.bfloat16) else [{}]:
                for mask in (True, False):
                    cases.append((f"{s.name} loss {kw} mask={mask} {dn}", lambda s=s, d=dtype, kw=kw, m=mask:
                                  _loss_case(s, s.micro_batch[0], d, mask=m, grad=True, **kw)))
            n = 1
            while dtype in (torch.float32, torch.bfloat16) and n <= max(s.micro_batch + s.rollout_n):
                cases.append((f"{s.name} loss N={n} {dn}", lambda s=s, n=n, d=dtype: _loss_case(
                    s, n, d, mask=True, grad=True)))
                cases.append((f"{s.name} sde N={n} {dn}", lambda s=s, n=n, d=dtype: _sde_case(s, n, d)))
                n *= 4
    return cases


def run_cases(arch: int, cases: list[tuple[str, Callable[[], None]]]) -> dict:
    """Compile every case for ``sm_<arch>``; a compile error is recorded per case, not raised.

    Returns:
        ``{"arch", "ptxas", "builds": [KernelBuild as dict], "errors": [{"case", "error"}], "launches"}``.
    """
    errors = []
    with aot_target(arch) as rec:
        for name, fn in cases:
            rec.case = name
            try:
                fn()
            except Exception as e:  # noqa: BLE001 (every failure is reported with its case)
                errors.append({"case": name, "error": f"{type(e).__name__}: {e}"[:2000]})
    return {"arch": arch, "ptxas": rec.ptxas, "builds": [asdict(b) for b in rec.builds],
            "errors": errors, "launches": rec.launches}


def main(argv: list[str] | None = None) -> int:
    """CLI: compile the ``ci`` or ``full`` cases for one architecture and write the JSON result."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, required=True, choices=sorted(MAX_SHARED))
    p.add_argument("--cases", choices=("ci", "full"), default="ci")
    p.add_argument("--out", required=True, help="JSON file to write")
    a = p.parse_args(argv)
    out = run_cases(a.arch, ci_cases() if a.cases == "ci" else full_cases())
    from fastnft.atomic import write_json_atomic

    write_json_atomic(a.out, out, indent=1, sort_keys=True)
    return 0


if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)
    sys.exit(main())
