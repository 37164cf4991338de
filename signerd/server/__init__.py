"""signerd.server."""
