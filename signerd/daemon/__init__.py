"""The signerd process: one process or a supervisor of workers, assembled from its role.

``main`` is the ``signerd`` command (``python -m signerd``).
"""

from ._main import main

__all__ = ["main"]
