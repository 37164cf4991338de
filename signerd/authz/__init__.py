"""signerd.authz."""
