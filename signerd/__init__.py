"""signerd: an Ed25519 signing daemon on a Unix socket, and its Python client.

This package exports the client API only: ``Client`` (sync), ``AsyncClient``
(aiohttp), their result types, and the typed errors they raise. The daemon
and the operator CLI (``signerctl``) live in their own modules.

``__version__`` is the package's version, the one source of it: pyproject.toml
reads it from here (``[tool.setuptools.dynamic]``). The client names are
imported on first use, so ``import signerd`` (and signerctl's start-up) does
not pay for the clients, let alone aiohttp.
"""

import typing as _typing

__version__ = "0.1.0"

if _typing.TYPE_CHECKING:
    from .client import (
        AsyncClient,
        Client,
        ConnectionFailed,
        FeedbackEnvelope,
        FeedbackVerified,
        KeyDescription,
        KeyVersion,
        KidInfo,
        RequestTimeout,
        RotationDue,
        Signature,
        TelemetrySignature,
        TelemetryVerified,
        TrustedKey,
        VerifyResult,
        VersionState,
    )

from .errors import (
    AttestationMismatch,
    AuditUnavailable,
    BackendError,
    BackendSealed,
    BackendUnavailable,
    ConfirmationRequired,
    DestroyedKid,
    IdempotencyKeyReused,
    InternalError,
    InvalidBase64,
    InvalidKeyName,
    InvalidRequest,
    InvalidSignature,
    InvalidState,
    KeyExists,
    MalformedJson,
    MethodNotAllowed,
    NonceStoreUnavailable,
    NotFound,
    NotSupported,
    OutcomeUnknown,
    PayloadTooLarge,
    PermissionDenied,
    RateLimited,
    ReplayedNonce,
    RetiredKid,
    SchemaMismatch,
    SharedPeerKey,
    SignerdError,
    StaleTimestamp,
    TenantMismatch,
    TooManyConnections,
    UnknownKey,
    UnknownKid,
    UnknownVersion,
    UnsupportedMediaType,
    VerificationError,
)

__all__ = [
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


# The client API's names are those of __all__ not bound above: imported on first use.
_LAZY = frozenset(__all__).difference(globals())


def __getattr__(name: str) -> _typing.Any:
    """The client API's names, imported from ``signerd.client`` when first asked for."""
    if name not in _LAZY:
        raise AttributeError(f"module 'signerd' has no attribute {name!r}")
    from . import client

    value = getattr(client, name)
    globals()[name] = value
    return value
