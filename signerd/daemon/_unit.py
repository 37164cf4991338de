"""What the installed ``signerd.service`` gives the daemon, read for ``signerd --check``.

``systemctl cat signerd.service`` (the unit and its drop-ins, in the order
systemd reads them) names the user the daemon runs as (``User=``), the
environment it sets (``Environment=``, e.g. ``SOFTHSM2_CONF``) and the
credentials it loads (``LoadCredential=NAME:PATH``). A check run from a shell
before ``systemctl reload`` sees the same files as the daemon will.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from dataclasses import dataclass, field

__all__ = ["UnitView", "read_unit"]

#: where systemd looks for ``LoadCredential=NAME`` given without a path
CREDSTORES = ("/etc/credstore", "/run/credstore", "/usr/local/lib/credstore", "/usr/lib/credstore")


@dataclass
class UnitView:
    user: str | None = None
    environment: dict[str, str] = field(default_factory=dict)
    #: credential name -> the file systemd would load it from
    credentials: dict[str, str] = field(default_factory=dict)


def read_unit(unit: str = "signerd.service") -> UnitView | None:
    """The unit as systemd has it installed, or None (no systemd, no such unit)."""
    try:
        done = subprocess.run(
            ["systemctl", "cat", "--", unit],
            capture_output=True,
            text=True,
            timeout=15,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:
        return None
    return parse_unit(done.stdout)


def parse_unit(text: str) -> UnitView:
    """The ``[Service]`` settings ``--check`` needs, later lines overriding earlier ones."""
    view = UnitView()
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line
            continue
        key, sep, value = line.partition("=")
        if not sep or section != "[Service]":
            continue
        key, value = key.strip(), value.strip()
        if key == "User":
            view.user = value or None
        elif key == "Environment":
            if not value:
                view.environment.clear()
            for item in _split(value):
                name, eq, setting = item.partition("=")
                if eq and name:
                    view.environment[name] = setting
        elif key == "LoadCredential":
            if not value:
                view.credentials.clear()
                continue
            name, _, path = value.partition(":")
            found = path or _credstore(name)
            if name and found and os.path.isabs(found):
                view.credentials[name] = found
    return view


def _split(value: str) -> list[str]:
    try:
        return shlex.split(value)
    except ValueError:
        return []


def _credstore(name: str) -> str | None:
    for directory in CREDSTORES:
        path = os.path.join(directory, name)
        if os.path.exists(path):
            return path
    return None
