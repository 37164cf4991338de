"""Benchmark harness: signerd against the ways a caller could sign instead.

``python -m bench.run [--quick] [--out DIR]`` measures, in one run and on one
machine, in-process signing (cryptography, SoftHSM through python-pkcs11),
OpenSSH's ssh-agent, OpenBao transit called directly, and signerd in front of
SoftHSM and of OpenBao; it prints a table of ratios against the named
references, and writes the same as JSON plus a latency chart (PNG).
"""
