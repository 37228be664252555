#!/usr/bin/env bash
# The test command: installs what the tests need, starts zfs-fuse, runs pytest.
# etcd, dockerd and network-namespace hosts are started by the tests themselves.
# Extra arguments go to pytest (e.g. tests/unit, -k conformance).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${FERRY_VENV:-/opt/ferry/venv}"
"$repo/deploy/install.sh" --dev
cd "$repo"
set +e
"$venv/bin/python" -m pytest -p no:cacheprovider "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
    echo "tests/run.sh: pytest collected no tests; that is a failure" >&2
    exit 1
fi
exit "$status"
