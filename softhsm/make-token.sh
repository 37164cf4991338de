#!/usr/bin/env bash
# Create (idempotently) a SoftHSM2 token for signerd development or tests.
#
#   softhsm/make-token.sh DIR [LABEL]
#
# Writes DIR/softhsm2.conf, DIR/tokens/, DIR/pin (mode 0600, a random PIN on
# first run) and initialises token LABEL (default signerd-dev) unless it
# exists. Prints the SOFTHSM2_CONF line to export.
set -euo pipefail
dir=${1:?usage: make-token.sh DIR [LABEL]}
label=${2:-signerd-dev}
here=$(cd "$(dirname "$0")" && pwd)
command -v softhsm2-util >/dev/null || { echo "make-token.sh: softhsm2-util not found (apt-get install softhsm2)" >&2; exit 69; }
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
  so_pin=$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')
  softhsm2-util --init-token --free --label "$label" --pin "$(cat "$dir/pin")" --so-pin "$so_pin" >/dev/null
fi
echo "SOFTHSM2_CONF=$dir/softhsm2.conf"
