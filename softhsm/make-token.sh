#!/usr/bin/env bash
# Create (idempotently) a SoftHSM2 token for signerd development or tests.
#
#   softhsm/make-token.sh DIR [LABEL]
#
# Writes DIR/softhsm2.conf, DIR/tokens/, DIR/pin (mode 0600, a random PIN on
# first run) and initialises token LABEL (default signerd-dev) unless it
# exists. Prints the SOFTHSM2_CONF line to export.
#
# No PIN is ever put on a command line (every local user can read every
# process's argv in /proc): softhsm2-util only takes PINs from argv or a
# terminal, so the token is initialised through PKCS#11 instead (C_InitToken,
# C_InitPIN) by python3 with ctypes, which reads the user PIN from DIR/pin. The
# SO PIN is random, lives only in that process's memory and is not kept.
# Environment: PYTHON (default python3), SOFTHSM2_MODULE (path of libsofthsm2.so).
set -euo pipefail
dir=${1:?usage: make-token.sh DIR [LABEL]}
label=${2:-signerd-dev}
here=$(cd "$(dirname "$0")" && pwd)
command -v softhsm2-util >/dev/null || { echo "make-token.sh: softhsm2-util not found (apt-get install softhsm2)" >&2; exit 69; }
[ "${#label}" -le 32 ] || { echo "make-token.sh: LABEL is longer than 32 characters" >&2; exit 64; }
mkdir -p "$dir/tokens"
chmod 0700 "$dir"
dir=$(cd "$dir" && pwd)
sed "s#@TOKENDIR@#$dir/tokens#" "$here/softhsm2.conf.in" > "$dir/softhsm2.conf"
export SOFTHSM2_CONF="$dir/softhsm2.conf"
umask 077
if [ ! -s "$dir/pin" ]; then
  od -An -N8 -tx1 /dev/urandom | tr -d ' \n' > "$dir/pin"
fi
if ! softhsm2-util --show-slots 2>/dev/null | grep -Eq "Label:[[:space:]]*${label}[[:space:]]*$"; then
  "${PYTHON:-python3}" - "$dir/pin" "$label" "${SOFTHSM2_MODULE:-}" <<'PY'
import ctypes
import os
import secrets
import sys

pin_path, label, module = sys.argv[1:4]
candidates = [module] if module else [
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
    "/usr/lib64/pkcs11/libsofthsm2.so",
]
path = next((c for c in candidates if os.path.exists(c)), None)
if path is None:
    sys.exit("make-token.sh: libsofthsm2.so not found (set SOFTHSM2_MODULE)")

ULONG = ctypes.c_ulong  # CK_ULONG on Unix
PTR = ctypes.c_void_p
CKF_TOKEN_INITIALIZED = 0x400
CKF_RW_SESSION, CKF_SERIAL_SESSION = 0x2, 0x4
CKU_SO = 0


class TokenInfo(ctypes.Structure):  # CK_TOKEN_INFO
    _fields_ = [
        ("label", ctypes.c_ubyte * 32),
        ("manufacturer", ctypes.c_ubyte * 32),
        ("model", ctypes.c_ubyte * 16),
        ("serial", ctypes.c_ubyte * 16),
        ("flags", ULONG),
        ("counts", ULONG * 10),
        ("versions", ctypes.c_ubyte * 4),
        ("utc_time", ctypes.c_ubyte * 16),
    ]


lib = ctypes.CDLL(path)
signatures = {
    "C_Initialize": [PTR],
    "C_Finalize": [PTR],
    "C_GetSlotList": [ctypes.c_ubyte, ctypes.POINTER(ULONG), ctypes.POINTER(ULONG)],
    "C_GetTokenInfo": [ULONG, ctypes.POINTER(TokenInfo)],
    "C_InitToken": [ULONG, ctypes.c_char_p, ULONG, ctypes.c_char_p],
    "C_OpenSession": [ULONG, ULONG, PTR, PTR, ctypes.POINTER(ULONG)],
    "C_Login": [ULONG, ULONG, ctypes.c_char_p, ULONG],
    "C_InitPIN": [ULONG, ctypes.c_char_p, ULONG],
    "C_Logout": [ULONG],
    "C_CloseSession": [ULONG],
}
for name, argtypes in signatures.items():
    fn = getattr(lib, name)
    fn.argtypes, fn.restype = argtypes, ULONG


def call(name, *args):
    rv = getattr(lib, name)(*args)
    if rv != 0:
        sys.exit(f"make-token.sh: {name} failed: CKR 0x{rv:08x}")


with open(pin_path, "rb") as fh:
    pin = fh.read().strip()
so_pin = secrets.token_hex(16).encode()
call("C_Initialize", None)
count = ULONG()
call("C_GetSlotList", 1, None, ctypes.byref(count))
slots = (ULONG * count.value)()
call("C_GetSlotList", 1, slots, ctypes.byref(count))
free = None
for slot in slots[: count.value]:
    info = TokenInfo()
    call("C_GetTokenInfo", slot, ctypes.byref(info))
    if not info.flags & CKF_TOKEN_INITIALIZED:
        free = slot
        break
if free is None:
    sys.exit("make-token.sh: no free SoftHSM slot")
call("C_InitToken", free, so_pin, len(so_pin), label.encode().ljust(32, b" "))
session = ULONG()
call("C_OpenSession", free, CKF_SERIAL_SESSION | CKF_RW_SESSION, None, None, ctypes.byref(session))
call("C_Login", session, CKU_SO, so_pin, len(so_pin))
call("C_InitPIN", session, pin, len(pin))
call("C_Logout", session)
call("C_CloseSession", session)
call("C_Finalize", None)
PY
fi
echo "SOFTHSM2_CONF=$dir/softhsm2.conf"
