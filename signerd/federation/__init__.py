"""Federation envelopes: signed telemetry and feedback, verified with replay protection.

``docs/federation.md`` states the exact formats. The modules:

* ``canonical``: strict JSON parsing and RFC 8785 canonicalisation;
* ``envelopes``: the signing inputs of both flows and their field grammars;
* ``trust``: trusted peer keys per tenant (configured, or added through the API);
* ``nonces``: the nonce stores (SQLite by default, Redis for several hosts);
* ``settings``: the ``[federation]`` table of the configuration;
* ``routes``: the HTTP endpoints and the verification in its fixed order.
"""
