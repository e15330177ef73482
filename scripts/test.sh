#!/usr/bin/env bash
# The tests: start PostgreSQL, Redis and NATS if they are down
# (scripts/services.sh), then run pytest with any arguments given
# (default: the whole suite, quietly).
#
#   scripts/test.sh                      # everything
#   scripts/test.sh tests/unit           # no service needed for these
#   PRISM_COVERAGE=1 scripts/test.sh     # measured in every process; fails under 85% (as CI)
#
# tests/unit needs no service: `python -m pytest tests/unit` runs anywhere.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/services.sh
args=("$@")
[ ${#args[@]} -gt 0 ] || args=(-q)

if [ "${PRISM_COVERAGE:-0}" = 1 ]; then
  rm -f .coverage .coverage.*
  status=0
  python -m coverage run -m pytest "${args[@]}" || status=$?
  python -m coverage combine -q
  python -m coverage report --skip-covered --sort=cover | tail -n 25
  # The totals, and a failure under 85% of lines (whatever the tests did).
  python scripts/coverage_total.py --fail-under-lines 85 || { [ "$status" -ne 0 ] || status=1; }
  exit "$status"
fi
exec python -m pytest "${args[@]}"
