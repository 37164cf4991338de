"""signerd.audit."""
