#!/bin/sh
# Check deploy/systemd/prism.service with `systemd-analyze verify`.
#
# The unit is copied to a temporary directory with ExecStart= pointing at a
# binary that exists here (the venv's `prism`, else `prism` on PATH, else
# /bin/true), so that the only complaint left about the installed path
# /usr/local/bin/prism does not hide real problems. systemd-analyze exits 0
# on misspelt keys and bad values ("Unknown key ..., ignoring"), so any line
# it prints about the unit counts as a failure too. Lines about other units
# (dependencies loaded from the host) are shown but do not fail the check.
#
# Also checks prism.sysusers.conf with systemd-sysusers in a scratch root.
# Exits 0 with a message when systemd-analyze is not installed.
#
# Usage: scripts/verify_systemd_unit.sh [UNIT_FILE]
set -eu

root=$(cd "$(dirname "$0")/.." && pwd)
unit=${1:-$root/deploy/systemd/prism.service}
sysusers=$(dirname "$unit")/prism.sysusers.conf

if ! command -v systemd-analyze >/dev/null 2>&1; then
    echo "verify_systemd_unit: systemd-analyze not found; skipping the check of $unit"
    exit 0
fi
if [ ! -f "$unit" ]; then
    echo "verify_systemd_unit: no such unit file: $unit" >&2
    exit 2
fi

if [ -x "$root/.venv/bin/prism" ]; then
    prism=$root/.venv/bin/prism
elif command -v prism >/dev/null 2>&1; then
    prism=$(command -v prism)
else
    prism=/bin/true
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
name=$(basename "$unit")
# Replace only the program of ExecStart=; keep its arguments.
sed "s|^ExecStart=[^ ]*|ExecStart=$prism|" "$unit" >"$tmp/$name"

status=0
output=$(systemd-analyze verify "$tmp/$name" 2>&1) || status=$?
if [ -n "$output" ]; then
    printf '%s\n' "$output" | sed "s|$tmp/||g"
fi
if [ "$status" -ne 0 ]; then
    echo "verify_systemd_unit: systemd-analyze verify failed (exit $status) for $unit" >&2
    exit 1
fi
if printf '%s\n' "$output" | grep -q "$name"; then
    echo "verify_systemd_unit: systemd-analyze reported problems in $unit" >&2
    exit 1
fi

if [ -f "$sysusers" ] && command -v systemd-sysusers >/dev/null 2>&1; then
    mkdir -p "$tmp/sysroot/etc"
    if ! systemd-sysusers --root="$tmp/sysroot" "$sysusers" >"$tmp/sysusers.log" 2>&1; then
        cat "$tmp/sysusers.log" >&2
        echo "verify_systemd_unit: systemd-sysusers rejected $sysusers" >&2
        exit 1
    fi
    if ! grep -q '^prism:' "$tmp/sysroot/etc/passwd"; then
        echo "verify_systemd_unit: $sysusers did not create the prism user" >&2
        exit 1
    fi
fi

echo "verify_systemd_unit: $unit OK (ExecStart checked as $prism)"
