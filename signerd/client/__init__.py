"""Python clients for signerd: ``Client`` (sync, standard library) and ``AsyncClient`` (aiohttp).

Both speak the v1 wire protocol (``docs/protocol.md``) over the daemon's Unix
socket with keep-alive connections, take a timeout per call (the client's
default, or ``timeout=`` on any method), and return frozen dataclasses::

    with Client("/run/signerd/signerd.sock") as signer:
        sig = signer.sign("acme/feedback", payload)   # Signature(kid, signature)
        signer.verify(sig.kid, payload, sig.signature)  # raises unless valid

Errors are the classes of ``signerd.errors``:

- an error answer from the daemon raises the class of its wire code
  (``error_for_code``), with the daemon's message and ``request_id``;
- ``ConnectionFailed`` (a ``BackendUnavailable``, so retryable): the socket
  cannot be reached or the connection broke mid-call; ``RequestTimeout``
  (a ``ConnectionFailed``): no complete answer within the timeout. Neither
  is a wire code; their ``code`` stays ``backend_unavailable``;
- an answer outside the protocol raises ``InternalError``.

Verification fails closed: ``verify`` and ``verify_local`` return only for a
valid signature, and raise ``InvalidSignature``, ``UnknownKid``,
``RetiredKid`` or ``DestroyedKid`` (all ``VerificationError``) otherwise.

Reads, ``sign`` and ``verify`` are sent a second time, once, when a reused
idle connection turns out to be broken. Create, rotate, promote, retire,
destroy and the trusted-key changes carry an ``Idempotency-Key`` made for
the call: when the connection breaks after sending, the call times out, or
signerd answers ``outcome_unknown``, the same request is sent again with the
same key (three times in all; once in doubt, also after a retryable refusal
such as the admin lock being busy), and signerd answers what the first one
did rather than doing it twice. When the outcome is still in doubt after the
third, the call raises ``OutcomeUnknown`` (its cause is the last failure).

The federation envelopes (``docs/federation.md``) have their own calls:
``telemetry_sign``/``telemetry_verify``, ``feedback_sign``/``feedback_verify``
(a verify returns only for an accepted envelope, whose nonce is then spent),
and ``trust_key``/``trusted_keys``/``retire_trusted_key`` for peer keys;
``signerd.gateway`` builds a gateway and a producer on them.

``Client`` is generated from ``AsyncClient`` (``_unasync``), so the two have
the same methods, parameters and docstrings; each method is one ``Op`` of
``_ops`` (the request and how its answer is read) run by a transport of
``_transport``.

``verify_local`` checks signatures in-process against public keys from
``/v1/jwks?tenant=T`` (the tenant is part of the kid), cached per tenant:

- the tenant's JWKS is fetched on first use and again when older than
  ``jwks_ttl`` seconds, so a retired kid stops verifying locally within
  ``jwks_ttl``;
- a kid that is not in the cache fetches the JWKS again, once (at most once
  per ``jwks_refetch_interval`` per tenant, so a stream of made-up kids
  cannot make the daemon serve a JWKS per message);
- the JWKS lists only pending, active and verify-only versions, so a kid
  still missing is looked up with ``/v1/kids/{kid}``: one small request that
  raises ``UnknownKid`` for a kid signerd does not know and ``RetiredKid`` or
  ``DestroyedKid`` for those states, exactly as the daemon's own verify does,
  and that supplies the key of a version published since the last fetch.
"""

from ..wire import VersionState
from ._async import AsyncClient
from ._keycache import KeyCache as KeyCache
from ._results import (
    FeedbackEnvelope,
    FeedbackVerified,
    KeyDescription,
    KeyVersion,
    KidInfo,
    RotationDue,
    Signature,
    TelemetrySignature,
    TelemetryVerified,
    TrustedKey,
    VerifyResult,
)
from ._sync import Client
from ._transport import DEFAULT_SOCKET as DEFAULT_SOCKET
from ._transport import ConnectionFailed, RequestTimeout, default_socket_path

# KeyCache (the gateway's producer) and DEFAULT_SOCKET (signerctl's help) are
# for signerd's own packages: importable from here, not part of the public API.

__all__ = [
    "AsyncClient",
    "Client",
    "ConnectionFailed",
    "FeedbackEnvelope",
    "FeedbackVerified",
    "KeyDescription",
    "KeyVersion",
    "KidInfo",
    "RequestTimeout",
    "RotationDue",
    "Signature",
    "TelemetrySignature",
    "TelemetryVerified",
    "TrustedKey",
    "VerifyResult",
    "VersionState",
    "default_socket_path",
]
