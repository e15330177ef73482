"""The installed h2 and hpack are the releases the fast path was checked against.

prism/rpc/h2conn.py, h2read.py, protocol.py and hpack_cache.py read and set private
state of h2's connection and streams and of hpack's encoder/decoder tables.
Another release may rename or change any of it without notice, so
pyproject.toml pins both exactly, and this test says which files to re-check
when the installed version is not the pinned one (a stale environment, or a
pin moved without the re-check).
"""

from __future__ import annotations

import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"
RECHECK = "prism/rpc/h2conn.py, h2read.py, protocol.py and hpack_cache.py"


def _pins() -> dict[str, str]:
    deps = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    pins = {}
    for dep in deps:
        name, sep, pinned = dep.partition("==")
        if sep:
            pins[name.strip().lower()] = pinned.strip()
    return pins


@pytest.mark.parametrize("package", ["h2", "hpack"])
def test_installed_release_is_the_pinned_one(package: str) -> None:
    pinned = _pins().get(package)
    assert pinned is not None, (
        f"pyproject.toml must pin {package} exactly (==): the fast path reads its internals"
    )
    installed = version(package)
    assert installed == pinned, (
        f"{package} {installed} is installed but pyproject.toml pins {pinned}: "
        f"re-check {RECHECK} against {package} {installed} (they use its private state), "
        "run tests/unit/test_plain_frames.py, then move the pin"
    )
