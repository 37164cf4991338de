"""signerd.daemon."""
