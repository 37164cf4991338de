"""Federation envelopes: signed telemetry and feedback, verified with replay protection.

``docs/federation.md`` states the exact formats. The modules:

* ``_routes``: the telemetry and feedback endpoints and the verification in its
  fixed order (``Federation``; ``attach`` serves them on the server);
* ``_trust_routes``: the trusted peer keys' endpoints;
* ``_trust``: trusted peer keys per tenant (configured, or added through the API);
* ``_nonces``, ``_redis_store``: the nonce stores (SQLite by default, Redis for
  several hosts);
* ``_settings``: the ``[federation]`` table of the configuration.

The envelope grammar and canonical JSON are ``signerd.wire``'s.
"""

from ._routes import Federation, attach
from ._settings import check_reload, trusted_key_errors

__all__ = ["Federation", "attach", "check_reload", "trusted_key_errors"]
