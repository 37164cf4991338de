"""The signerd process: one process or a supervisor of workers, assembled from its role.

``main`` is the ``signerd`` command (``python -m signerd``).
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """``signerd [--config F] [--check]``: the exit status."""
    # imported here: the configuration and the server still import this package's
    # systemd glue (credential_path, log_request), so it must not import them back
    from ._main import main as run

    return run(argv)
