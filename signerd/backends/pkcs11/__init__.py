"""signerd.backends.pkcs11."""
