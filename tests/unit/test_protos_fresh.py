"""The committed code generated from protos/ferry/v1/*.proto matches the .proto files."""

import filecmp
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
GENERATED = REPO / "protos" / "ferry" / "v1"


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    protos = sorted(GENERATED.glob("*.proto"))
    assert protos, "no .proto files under protos/ferry/v1"
    subprocess.run(
        [str(REPO / "protos" / "generate.sh"), str(tmp_path)],
        check=True,
        env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"},
    )
    fresh = sorted(p.name for p in (tmp_path / "protos" / "ferry" / "v1").iterdir())
    committed = sorted(
        p.name for p in GENERATED.iterdir() if p.name.endswith(("_pb2.py", "_pb2_grpc.py", ".pyi"))
    )
    assert fresh == committed, "generated files differ: run protos/generate.sh and commit"
    stale = [
        name
        for name in fresh
        if not filecmp.cmp(tmp_path / "protos/ferry/v1" / name, GENERATED / name, shallow=False)
    ]
    assert not stale, f"stale generated code {stale}: run protos/generate.sh and commit"
