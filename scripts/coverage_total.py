"""Print the combined coverage of a test run and fail below a line coverage bound.

    python scripts/coverage_total.py [--fail-under-lines 85]

Reads the combined data (``coverage combine`` first) through coverage's own
JSON report: line coverage (statements run), branch coverage, and
coverage.py's total of both.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fail-under-lines", type=float, default=85.0, metavar="PERCENT")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "coverage.json"
        subprocess.run([sys.executable, "-m", "coverage", "json", "-q", "-o", str(out)], check=True)
        totals = json.loads(out.read_text())["totals"]
    lines = 100.0 * totals["covered_lines"] / max(1, totals["num_statements"])
    branches = 100.0 * totals["covered_branches"] / max(1, totals["num_branches"])
    print(
        f"coverage: lines {lines:.1f}% ({totals['covered_lines']} of {totals['num_statements']}), "
        f"branches {branches:.1f}% ({totals['covered_branches']} of {totals['num_branches']}), "
        f"total {totals['percent_covered']:.1f}%"
    )
    if lines < args.fail_under_lines:
        print(f"coverage: lines {lines:.1f}% is under {args.fail_under_lines:g}%", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
