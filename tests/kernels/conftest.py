"""Kernel tests run the Triton kernels on CPU through the interpreter (``TRITON_INTERPRET=1``).

The variable must be set before the ``@triton.jit`` kernels are defined (at import of
``fastnft.kernels.stepnft_loss`` / ``fastnft.kernels.sde_step``), so it is set here at conftest import; if an
earlier test module already imported a kernel module compiled-mode, it is reloaded. The interpreter's cost is
per program: the launchers default to few, large programs on CPU.
"""

from __future__ import annotations

import importlib
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"

for _name in ("fastnft.kernels.stepnft_loss", "fastnft.kernels.sde_step"):
    _mod = sys.modules.get(_name)
    if _mod is not None and not _mod.INTERPRETED:
        importlib.reload(_mod)
        _pkg = sys.modules["fastnft.kernels"]
        for _export in ("stepnft_loss", "sde_step", "ode_step", "fused_sde_step"):
            _pkg.__dict__.pop(_export, None)  # re-resolved lazily from the reloaded module
