"""Regenerate the protobuf module from proto/fpolicy.proto (never edit the generated files by hand).

    .venv/bin/python proto/generate.py            # writes src/fpolicyd/protocol/fpolicy_pb2.py and .pyi
    .venv/bin/python proto/generate.py --out DIR  # writes them to DIR instead (the drift test compares)

Uses the protoc bundled with grpcio-tools and the mypy-protobuf plugin, both pinned in the dev dependencies so
that the output is byte-for-byte reproducible.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from grpc_tools import protoc

PROTO_DIR = Path(__file__).resolve().parent
DEFAULT_OUT = PROTO_DIR.parent / "src" / "fpolicyd" / "protocol"


def generate(out_dir: Path) -> None:
    plugin = Path(sys.executable).parent / "protoc-gen-mypy"
    args = [
        "protoc",
        f"--proto_path={PROTO_DIR}",
        f"--plugin=protoc-gen-mypy={plugin}",
        f"--python_out={out_dir}",
        f"--mypy_out={out_dir}",
        str(PROTO_DIR / "fpolicy.proto"),
    ]
    code = protoc.main(args)
    if code != 0:
        raise SystemExit(f"protoc failed with exit code {code}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    generate(parser.parse_args().out)


if __name__ == "__main__":
    main()
