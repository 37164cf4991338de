"""The package's public surface: what ``import signerd`` offers, and nothing else."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from pathlib import Path
from typing import Any

import signerd
from signerd import client, errors

EXPECTED = [
    "AsyncClient",
    "AttestationMismatch",
    "AuditUnavailable",
    "BackendError",
    "BackendSealed",
    "BackendUnavailable",
    "Client",
    "ConfirmationRequired",
    "ConnectionFailed",
    "DestroyedKid",
    "FeedbackEnvelope",
    "FeedbackVerified",
    "IdempotencyKeyReused",
    "InternalError",
    "InvalidBase64",
    "InvalidKeyName",
    "InvalidRequest",
    "InvalidSignature",
    "InvalidState",
    "KeyDescription",
    "KeyExists",
    "KeyVersion",
    "KidInfo",
    "MalformedJson",
    "MethodNotAllowed",
    "NonceStoreUnavailable",
    "NotFound",
    "NotSupported",
    "OutcomeUnknown",
    "PayloadTooLarge",
    "PermissionDenied",
    "RateLimited",
    "ReplayedNonce",
    "RequestTimeout",
    "RetiredKid",
    "RotationDue",
    "SchemaMismatch",
    "SharedPeerKey",
    "Signature",
    "SignerdError",
    "StaleTimestamp",
    "TelemetrySignature",
    "TelemetryVerified",
    "TenantMismatch",
    "TooManyConnections",
    "TrustedKey",
    "UnknownKey",
    "UnknownKid",
    "UnknownVersion",
    "UnsupportedMediaType",
    "VerificationError",
    "VerifyResult",
    "VersionState",
]


def test_all_is_pinned() -> None:
    """signerd.__all__ is exactly the client API, sorted; changing it is a deliberate act."""
    assert signerd.__all__ == EXPECTED


def test_every_exported_name_exists_and_nothing_else_is_public() -> None:
    """Each name in __all__ resolves; the package exposes no other public name but its modules."""
    for name in signerd.__all__:
        assert getattr(signerd, name) is not None
    public = {n for n in vars(signerd) if not n.startswith("_")}
    modules = {n for n in public if inspect.ismodule(getattr(signerd, n))}
    assert public - modules == set(EXPECTED)


def test_every_wire_error_class_is_exported() -> None:
    """Every class a wire code maps to can be caught as signerd.<Class>."""
    for cls in errors.CODES.values():
        assert getattr(signerd, cls.__name__) is cls


def test_client_errors_are_signerd_errors() -> None:
    """Connection failures are retryable BackendUnavailable errors, caught with SignerdError."""
    assert issubclass(signerd.ConnectionFailed, errors.BackendUnavailable)
    assert issubclass(signerd.RequestTimeout, signerd.ConnectionFailed)
    assert signerd.ConnectionFailed.retryable
    assert signerd.ConnectionFailed.code not in {
        c for c in errors.CODES if c != "backend_unavailable"
    }
    assert errors.CODES["backend_unavailable"] is errors.BackendUnavailable


def test_results_are_frozen_dataclasses() -> None:
    """Every result type is a frozen dataclass."""
    for cls in (
        client.KeyDescription,
        client.KeyVersion,
        client.KidInfo,
        client.Signature,
        client.VerifyResult,
    ):
        assert dataclasses.is_dataclass(cls)
        assert getattr(cls, "__dataclass_params__").frozen  # noqa: B009


def _public_methods(cls: type) -> dict[str, Any]:
    return {n: f for n, f in vars(cls).items() if not n.startswith("_") and callable(f)}


def test_sync_and_async_clients_offer_the_same_methods() -> None:
    """Client and AsyncClient have the same public methods, the async ones as coroutines."""
    sync, async_ = _public_methods(client.Client), _public_methods(client.AsyncClient)
    assert sync.keys() == async_.keys()
    assert len(sync) >= 24
    for name, func in sync.items():
        assert not inspect.iscoroutinefunction(func), name
        assert inspect.iscoroutinefunction(async_[name]), name


def test_sync_and_async_methods_have_the_same_signatures_and_docstrings() -> None:
    """Each method's parameters (names, kinds, defaults, annotations), return annotation and
    docstring are the same on Client and AsyncClient, and every one has a docstring."""
    sync, async_ = _public_methods(client.Client), _public_methods(client.AsyncClient)
    for name, func in sync.items():
        mine, theirs = inspect.signature(func), inspect.signature(async_[name])
        assert [(p.name, p.kind, p.default, p.annotation) for p in mine.parameters.values()] == [
            (p.name, p.kind, p.default, p.annotation) for p in theirs.parameters.values()
        ], name
        assert mine.return_annotation == theirs.return_annotation, name
        assert func.__doc__ and func.__doc__ == async_[name].__doc__, name
    init = inspect.signature(client.Client.__init__)
    assert init == inspect.signature(client.AsyncClient.__init__)


#: the modules users may import; everything else in signerd is internal: a module whose
#: name starts with "_", or one of the daemon's own subpackages, whose interfaces serve
#: the package itself and may change in any release
PUBLIC_MODULES = {
    "signerd",
    "signerd.client",
    "signerd.errors",
    "signerd.gateway",
    "signerd.testing",
}
INTERNAL_PACKAGES = {
    "signerd.audit",
    "signerd.authz",
    "signerd.backends",
    "signerd.backends.pkcs11",
    "signerd.backends.vault",
    "signerd.cli",
    "signerd.daemon",
    "signerd.federation",
    "signerd.forwarding",
    "signerd.keys",
    "signerd.metrics",
    "signerd.server",
    "signerd.wire",
    "signerd.workers",
}


def test_every_module_is_declared_public_or_internal() -> None:
    """Each signerd module is listed public, is an internal subpackage, or has a "_" name."""
    root = Path(signerd.__file__).parent
    undeclared = []
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        name = ".".join(parts)
        private = any(p.startswith("_") and p not in ("__main__",) for p in parts)
        if name in PUBLIC_MODULES or name in INTERNAL_PACKAGES or private:
            continue
        undeclared.append(name)
    assert sorted(undeclared) == ["signerd.__main__", "signerd.cli.__main__"]
    for name in PUBLIC_MODULES:
        assert importlib.import_module(name).__doc__


def test_lazy_names_are_the_client_api() -> None:
    """The names signerd imports on first use are exactly signerd.client's public API."""
    lazy = getattr(signerd, "_LAZY")  # noqa: B009
    assert lazy == set(client.__all__) - {"default_socket_path"}
    assert lazy == set(EXPECTED) - set(errors.__all__)
