"""Regenerates the committed Python stubs from `moe_cluster.proto`.

Run from the repository root: `python -m deployments.protos.regenerate`. The stubs import each
other as `deployments.protos.*`, so protoc runs with the repository root as include path.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO = Path("deployments/protos/moe_cluster.proto")


def main() -> int:
    from grpc_tools import protoc

    args = ["grpc_tools.protoc", f"-I{ROOT}", f"--python_out={ROOT}", f"--pyi_out={ROOT}",
            f"--grpc_python_out={ROOT}", str(ROOT / PROTO)]
    return protoc.main(args)


if __name__ == "__main__":
    sys.exit(main())
