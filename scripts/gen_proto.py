"""Regenerate prism/proto/*_pb2*.py with grpcio-tools' bundled protoc.

Run from anywhere: ``python scripts/gen_proto.py``. ``--check`` regenerates
into a temporary folder and exits 1 if the committed files differ.
"""

from __future__ import annotations

import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "prism" / "proto"


def generate(out: Path) -> list[Path]:
    """Generate every proto under prism/proto into ``out`` (same layout)."""
    import grpc_tools

    include = Path(grpc_tools.__file__).parent / "_proto"
    sources = sorted(PROTO_DIR.glob("*.proto"))
    args = [
        "protoc",
        f"-I{ROOT}",
        f"-I{include}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *(str(p.relative_to(ROOT)) for p in sources),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    gen = out / "prism" / "proto"
    return sorted(p for p in gen.iterdir() if p.suffix in (".py", ".pyi"))


def main() -> int:
    check = "--check" in sys.argv[1:]
    with tempfile.TemporaryDirectory() as tmp:
        files = generate(Path(tmp))
        stale = []
        for f in files:
            dest = PROTO_DIR / f.name
            if check:
                if not dest.exists() or not filecmp.cmp(f, dest, shallow=False):
                    stale.append(f.name)
            else:
                shutil.copyfile(f, dest)
        if stale:
            print("generated code is stale, run scripts/gen_proto.py:", ", ".join(stale))
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
