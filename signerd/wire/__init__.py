"""signerd.wire."""
