"""signerd.keys."""
