"""signerd.wire: the contract both ends of the socket share.

Names (``KeyName``, kids), strict JSON and its RFC 8785 form, JWKs and
Ed25519 public-key checks, the v1 request and response bodies, and the
federation envelopes' grammar and signing inputs. Each rule exists once, here;
the server, the client, the CLI and the gateway import it from this package.
Nothing here imports any other part of signerd but ``signerd.errors``.
"""

from ._bodies import (
    Key,
    Version,
    b64decode,
    b64encode,
    field_bool,
    field_str,
    key_json,
    kid_json,
    parse_object,
    request_id_from,
    version_json,
)
from ._ed25519 import check_public, weakness
from ._envelopes import (
    ATTESTATION_MEMBER,
    ATTESTATION_RE,
    FEEDBACK_FIELDS,
    MIN_NONCE_BYTES,
    PEER_KID_RE,
    attestation_of_body,
    attestation_of_data,
    check_attestation,
    check_kid,
    check_nonce,
    check_schema,
    check_tenant,
    check_timestamp,
    decimal_seconds,
    feedback_input,
    telemetry_input,
    valid_peer_kid,
)
from ._jwk import b64url, b64url_decode, from_jwk, thumbprint, to_jwk, to_pem
from ._names import MAX_VERSION, KeyName, VersionState, parse_kid, parse_version, valid_part
from ._strict_json import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_DEPTH,
    MAX_SAFE_INT,
    canonical,
    canonical_data,
    canonicalize,
    check_json,
    loads_strict,
    parse_json,
)

__all__ = [
    "ATTESTATION_MEMBER",
    "ATTESTATION_RE",
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_DEPTH",
    "FEEDBACK_FIELDS",
    "MAX_SAFE_INT",
    "MAX_VERSION",
    "MIN_NONCE_BYTES",
    "PEER_KID_RE",
    "Key",
    "KeyName",
    "Version",
    "VersionState",
    "attestation_of_body",
    "attestation_of_data",
    "b64decode",
    "b64encode",
    "b64url",
    "b64url_decode",
    "canonical",
    "canonical_data",
    "canonicalize",
    "check_attestation",
    "check_json",
    "check_kid",
    "check_nonce",
    "check_public",
    "check_schema",
    "check_tenant",
    "check_timestamp",
    "decimal_seconds",
    "feedback_input",
    "field_bool",
    "field_str",
    "from_jwk",
    "key_json",
    "kid_json",
    "loads_strict",
    "parse_json",
    "parse_kid",
    "parse_object",
    "parse_version",
    "request_id_from",
    "telemetry_input",
    "thumbprint",
    "to_jwk",
    "to_pem",
    "valid_part",
    "valid_peer_kid",
    "version_json",
    "weakness",
]
