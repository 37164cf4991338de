"""Write ``_sync.py`` (``Client``) from ``_async.py`` (``AsyncClient``).

The two clients have the same methods, parameters, annotations and docstrings;
only the transport differs. So the sync one is not written by hand: it is the
async source with ``async``/``await`` taken out and the async names swapped
for their sync counterparts (the way httpcore keeps its two APIs in step),
then formatted with ``ruff format`` (lines that got shorter may join).
``tests/test_client_unit.py`` checks that the committed ``_sync.py`` is what
this produces.

    python signerd/client/_unasync.py           # rewrite _sync.py
    python signerd/client/_unasync.py --check   # exit 1 when _sync.py is stale
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
SOURCE = HERE / "_async.py"
TARGET = HERE / "_sync.py"

# Text that differs between the two files beyond the word swaps: each async
# block must occur exactly once in the source.
_BLOCKS: tuple[tuple[str, str], ...] = (
    (
        '''"""``AsyncClient``: the v1 API as coroutines, on aiohttp (see ``signerd.client``).

This file is the source of both clients: ``_sync.py`` (``Client``) is generated
from it by ``python signerd/client/_unasync.py``, and a test checks that the
committed file is current. Each method names its ``Op`` (``_ops``) and hands
it to the transport, so the request and the answer's parsing live in one place.
"""''',
        '''"""``Client``: the v1 API, blocking, on ``http.client`` (see ``signerd.client``).

GENERATED from ``_async.py`` by ``python signerd/client/_unasync.py``: edit
that file and run the generator; do not edit this one.
"""''',
    ),
    (
        '''    """The same API as ``Client``, awaitable, on aiohttp. Use as ``async with AsyncClient(...)``."""''',
        '''    """Sync signerd client. Thread-safe: each concurrent call uses its own pooled connection.

    ``close()`` closes the idle connections; the client stays usable.
    """''',
    ),
)

_WORDS: tuple[tuple[str, str], ...] = (
    (r"\basync def ", "def "),
    (r"\basync with ", "with "),
    (r"\bawait ", ""),
    (r"\bAsyncClient\b", "Client"),
    (r"\bAsyncTransport\b", "SyncTransport"),
    (r"\b__aenter__\b", "__enter__"),
    (r"\b__aexit__\b", "__exit__"),
)


def generate(source: str) -> str:
    """The sync client's source from the async client's (needs ``ruff``, a test dependency)."""
    for old, new in _BLOCKS:
        if source.count(old) != 1:
            raise ValueError(f"_unasync: block not found once in the source: {old[:60]!r}")
        source = source.replace(old, new)
    for pattern, replacement in _WORDS:
        source = re.sub(pattern, replacement, source)
    return _format(source)


def _format(source: str) -> str:
    command = [sys.executable, "-m", "ruff", "format", "--stdin-filename", str(TARGET), "-"]
    done = subprocess.run(command, input=source, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"_unasync: ruff format failed: {done.stderr.strip()}")
    return done.stdout


def main(argv: list[str]) -> int:
    text = generate(SOURCE.read_text(encoding="utf-8"))
    if argv == ["--check"]:
        current = TARGET.read_text(encoding="utf-8") if TARGET.exists() else ""
        if current != text:
            print(f"{TARGET} is stale: run python signerd/client/_unasync.py", file=sys.stderr)
            return 1
        return 0
    if argv:
        print("usage: python signerd/client/_unasync.py [--check]", file=sys.stderr)
        return 2
    TARGET.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
