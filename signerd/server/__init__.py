"""signerd.server: HTTP/1.1 on the Unix socket.

``Server`` serves the v1 routes on a listening socket; a feature (the
federation) adds its own with ``Server.add_routes``: (method, path, handler,
``Operation``) each, where a handler takes a ``RequestContext`` and returns a
``Response``. ``Limits`` are what one caller may hold of the server.
"""

from ._context import (
    AdminChange,
    AuditNotes,
    Handler,
    Made,
    RequestContext,
    check_fields,
    sha256_hex,
)
from ._dispatch import Front, Observe, PeerLookup, VisibilityGate
from ._idemstore import IdempotencyStore
from ._limits import Limits, Throttled
from ._listener import Listener, UidCounter, connection_cap, raise_nofile_limit
from ._request import Request, Response, json_response
from ._requestlog import log_request, log_requests_to_journal
from ._v1 import ROUTES, Server

__all__ = [
    "ROUTES",
    "AdminChange",
    "AuditNotes",
    "Front",
    "Handler",
    "IdempotencyStore",
    "Limits",
    "Listener",
    "Made",
    "Observe",
    "PeerLookup",
    "Request",
    "RequestContext",
    "Response",
    "Server",
    "Throttled",
    "UidCounter",
    "VisibilityGate",
    "check_fields",
    "connection_cap",
    "json_response",
    "log_request",
    "log_requests_to_journal",
    "raise_nofile_limit",
    "sha256_hex",
]
