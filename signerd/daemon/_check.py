"""``signerd --check``: the configuration checked as start-up would meet it, every error listed.

Run before ``systemctl reload`` on the host itself: the credentials resolve as
the unit loads them (``--credentials-dir``, ``$CREDENTIALS_DIRECTORY``, or the
``LoadCredential=`` files of the installed ``signerd.service``, whose
``Environment=`` is applied too), each backend is opened and logged in (a
refused PIN or token is reported with the line the daemon would print), the
socket directory is held to the rules the daemon applies (for the unit's
``User=``), and every user and group the policy names and every federation
key file is looked up. Independent parts are checked independently, so one
run lists every error; nothing is created (the socket, the audit trail and
keys are left alone). Exit 0 when it passes, 78 (EX_CONFIG) otherwise.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import shutil
import sys
import tempfile
import tomllib
from collections.abc import Iterator, Mapping
from typing import Any

from .._config import Config, ConfigError, parse
from ..audit import audit_settings
from ..backends import load_factory
from ..errors import SignerdError
from ..federation import trusted_key_errors
from ._assemble import build_policy
from ._failures import describe
from ._sockets import SocketError, socket_path_errors
from ._unit import UnitView, read_unit

__all__ = ["check_errors", "run_check"]


def run_check(path: str, credentials_dir: str | None, unit: str = "signerd.service") -> int:
    """Print every error (stderr) or ``PATH: ok`` (stdout); the exit status."""
    with _environment(credentials_dir, read_unit(unit)) as (owner, errors):
        errors += check_errors(path, owner)
    for line in errors:
        print(f"signerd: {line}", file=sys.stderr)
    if errors:
        print(f"signerd: {path}: {len(errors)} error(s)", file=sys.stderr, flush=True)
        return os.EX_CONFIG
    print(f"signerd: {path}: ok", flush=True)
    return os.EX_OK


@contextlib.contextmanager
def _environment(
    credentials_dir: str | None, view: UnitView | None
) -> Iterator[tuple[int, list[str]]]:
    """The daemon's environment for the check: (the uid it runs as, errors found so far)."""
    saved = dict(os.environ)
    errors: list[str] = []
    owner = os.geteuid()
    temp: str | None = None
    try:
        if view is not None:
            for name, value in view.environment.items():
                os.environ.setdefault(name, value)
            if view.user is not None:
                try:
                    owner = pwd.getpwnam(view.user).pw_uid
                except KeyError:
                    errors.append(f"configuration error: the unit's User= {view.user!r} is unknown")
        if credentials_dir is not None:
            if not os.path.isdir(credentials_dir):
                errors.append(
                    f"configuration error: --credentials-dir: no directory {credentials_dir}"
                )
            os.environ["CREDENTIALS_DIRECTORY"] = os.path.abspath(credentials_dir)
        elif not os.environ.get("CREDENTIALS_DIRECTORY") and view is not None and view.credentials:
            temp = tempfile.mkdtemp(prefix="signerd-check-")  # 0700, links only
            for name, target in view.credentials.items():
                os.symlink(target, os.path.join(temp, name))
            os.environ["CREDENTIALS_DIRECTORY"] = temp
        yield owner, errors
    finally:
        os.environ.clear()
        os.environ.update(saved)
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)


def check_errors(path: str, owner: int) -> list[str]:
    """Every error start-up would meet with ``path``, each a line as the daemon says it."""
    try:
        with open(path, "rb") as fh:
            doc = tomllib.load(fh)
    except OSError as exc:
        return [_config_line(f"cannot read configuration {path}: {exc.strerror}")]
    except tomllib.TOMLDecodeError as exc:
        return [_config_line(f"{path}: not valid TOML: {exc}")]
    base = os.path.dirname(os.path.abspath(path))
    names = _policy_name_errors(doc.get("policy"))
    errors = [_config_line(e) for e in names]
    federation = doc.get("federation")
    if isinstance(federation, dict):
        unreadable = trusted_key_errors(federation, base)
        errors += [_config_line(e) for e in unreadable]
        if unreadable:  # reported: the rest is checked without them
            doc = {**doc, "federation": {**federation, "trusted_keys": []}}
    try:
        config = parse(doc, path=path)
    except ConfigError as exc:
        return _unique([*errors, _config_line(str(exc))])
    if not names:
        errors += _try(lambda: build_policy(config))
    errors += _try(lambda: _audit(config))
    errors += [
        _line(SocketError(e)) for e in socket_path_errors(config.socket, config.socket_group, owner)
    ]
    for name, table in config.backends.items():
        errors += _backend_errors(name, table)
    return _unique(errors)


def _backend_errors(name: str, table: Mapping[str, Any]) -> list[str]:
    """The backend built from its table, opened and logged in, then closed."""
    try:
        backend = load_factory(str(table["type"]))(table)
    except ValueError as exc:
        return [_config_line(f"backends.{name}.{exc}")]
    except SignerdError as exc:
        return [f"{_line(exc)} [backends.{name}]"]
    try:
        backend.check()
    except SignerdError as exc:
        return [f"{_line(exc)} [backends.{name}]"]
    finally:
        with contextlib.suppress(Exception):
            backend.close()
    return []


def _audit(config: Config) -> None:
    try:
        audit_settings(config.audit)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


def _policy_name_errors(policy: Any) -> list[str]:
    """Each user and group a policy rule names that this host does not know."""
    rules = policy.get("rules") if isinstance(policy, dict) else None
    if not isinstance(rules, list):
        return []
    errors = []
    for i, rule in enumerate(rules):
        if not isinstance(rule, dict):
            continue
        for key, kind in (("users", "user"), ("groups", "group")):
            names = rule.get(key)
            if not isinstance(names, list):
                continue
            for name in names:
                if not isinstance(name, str) or name == "*" or _known(kind, name):
                    continue
                errors.append(f"policy.rules[{i}].{key}: unknown {kind} {name!r}")
    return errors


def _known(kind: str, name: str) -> bool:
    try:
        if kind == "user":
            pwd.getpwnam(name)
        else:
            grp.getgrnam(name)
    except KeyError:
        return False
    return True


def _try(step: Any) -> list[str]:
    try:
        step()
    except (ConfigError, SignerdError, SocketError) as exc:
        return [_line(exc)]
    return []


def _line(exc: BaseException) -> str:
    described = describe(exc)
    return described[1] if described is not None else f"configuration error: {exc}"


def _config_line(message: str) -> str:
    return _line(ConfigError(message))


def _unique(lines: list[str]) -> list[str]:
    return list(dict.fromkeys(lines))
