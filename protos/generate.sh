#!/usr/bin/env bash
# Regenerate the Python code for protos/ferry/v1/*.proto (committed; a test fails when stale).
# Run from anywhere: the output lands beside the .proto files, importable as protos.ferry.v1.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-$repo}"
cd "$repo"
python="${PYTHON:-python3}"
# protoc-gen-mypy (mypy-protobuf) lives beside the interpreter.
PATH="$("$python" -c 'import os, sys; print(os.path.dirname(sys.executable))'):$PATH"
"$python" -m grpc_tools.protoc -I . \
    --python_out="$out" --grpc_python_out="$out" --mypy_out="$out" \
    protos/ferry/v1/*.proto
