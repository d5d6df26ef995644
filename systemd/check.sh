#!/bin/sh
# Verify the systemd units and print the service's security exposure (`make check-systemd`).
# Needs only the systemd-analyze binary, not a running systemd; skips cleanly without it.
# Fails if a unit does not verify or the exposure rises above $FERRY_MAX_EXPOSURE (default 2.0).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
venv=${VENV:-$here/../.venv}
max=${FERRY_MAX_EXPOSURE:-2.0}

if ! command -v systemd-analyze >/dev/null 2>&1; then
    echo "check-systemd: systemd-analyze not installed; skipped (apt-get install systemd to enable)"
    exit 0
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# The units name the installed paths (/opt/ferry/.venv); verify them against this checkout's venv,
# so that `verify` also checks that the ExecStart= commands exist and are executable.
for unit in ferry.service ferry.socket; do
    sed "s#/opt/ferry/.venv#$(cd "$venv" && pwd)#g" "$here/$unit" >"$tmp/$unit"
done
systemd-analyze verify "$tmp/ferry.service" "$tmp/ferry.socket"
echo "check-systemd: ferry.service and ferry.socket verify"

systemd-analyze security --offline=yes --threshold="$(echo "$max" | awk '{ print int($1 * 10) }')" \
    "$here/ferry.service" >"$tmp/security" 2>&1 || {
    grep -v '^✓' "$tmp/security"
    echo "check-systemd: exposure above $max"
    exit 1
}
grep -v '^✓' "$tmp/security"
