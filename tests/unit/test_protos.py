"""The committed generated protobuf modules match their .proto sources."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GENERATED = ROOT / "protos" / "gen" / "keystay" / "v1"


def test_generated_modules_are_fresh(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{ROOT / 'protos'}",
         f"--python_out={tmp_path}", f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}",
         str(ROOT / "protos" / "keystay" / "v1" / "device.proto")],
        check=True,
    )
    for name in ("device_pb2.py", "device_pb2.pyi", "device_pb2_grpc.py"):
        fresh = (tmp_path / "keystay" / "v1" / name).read_bytes()
        committed = (GENERATED / name).read_bytes()
        assert fresh == committed, f"{name} is stale: run 'make protos' and commit the result"
