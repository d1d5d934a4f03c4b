"""How the command-line entry points report input errors: one line, the fix in it, exit status 2.

    with friendly_errors():
        run(args)

Used by ``fastnft`` (:mod:`fastnft.cli`) and ``python -m fastnft.train``; it imports the error types only when an
error is caught, so entering it costs nothing.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

__all__ = ["friendly_errors"]


@contextlib.contextmanager
def friendly_errors() -> Iterator[None]:
    """Turn input errors into ``error: <message>`` on stderr and exit status 2 (``FASTNFT_DEBUG=1`` re-raises)."""
    from fastnft.config import ConfigError
    from fastnft.engine.checkpoint import CheckpointError
    from fastnft.policies.io import PolicyFileError

    try:
        yield
    except (ConfigError, CheckpointError, PolicyFileError, FileNotFoundError, ValueError, RuntimeError) as e:
        if os.environ.get("FASTNFT_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        print("(set FASTNFT_DEBUG=1 for the traceback)", file=sys.stderr)
        sys.exit(2)
