"""signerd.backends.vault."""
