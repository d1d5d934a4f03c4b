"""Kernel tests run the Triton kernels on CPU through the interpreter (``TRITON_INTERPRET=1``).

The variable must be set before the ``@triton.jit`` kernels are defined (at import of
``fastnft.kernels._common`` / ``stepnft_loss`` / ``sde_step``), so it is set here at conftest import; if an
earlier test module already imported them compiled-mode, they are reloaded, the shared helpers first (the getters
of ``fastnft.kernels`` import the kernel modules when called, so they see the reloaded functions). The interpreter's cost is
per program: the launchers default to few, large programs on CPU.
"""

from __future__ import annotations

import importlib
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"

for _name in ("fastnft.kernels._common", "fastnft.kernels.stepnft_loss", "fastnft.kernels.sde_step"):
    _mod = sys.modules.get(_name)
    if _mod is not None and not _mod.INTERPRETED:
        importlib.reload(_mod)
