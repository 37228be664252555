"""deploy/install.sh run a second time does only what changed.

The script runs in a sandbox: a copy of it in a throwaway checkout, commands it must not
run for real (``apt-get``, ``dpkg-query``, ``id``) replaced on PATH, and a venv whose
python only records how it was called. Provisioning an emulated guest from an image that
install.sh already ran in took more than 30 minutes because pip ran again with nothing to do.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

SHIMS = {
    # Root, as install.sh demands; every package installed; apt must not be needed.
    "id": "#!/bin/sh\necho 0\n",
    "dpkg-query": (
        '#!/bin/sh\nfor arg; do case "$arg" in -*) ;; *) echo "$arg install ok installed" ;;'
        " esac; done\n"
    ),
    "apt-get": '#!/bin/sh\necho "apt-get $*" >>"$SANDBOX_CALLS"\nexit 1\n',
}
# The venv's python: records its arguments; FAIL_PIP makes pip fail.
VENV_PYTHON = (
    '#!/bin/sh\necho "python $*" >>"$SANDBOX_CALLS"\n'
    'if [ -n "${FAIL_PIP:-}" ]; then echo "pip: no matching distribution" >&2; exit 1; fi\n'
)


def sandbox(tmp_path: Path) -> Path:
    checkout = tmp_path / "checkout"
    (checkout / "deploy").mkdir(parents=True)
    for name in ("deploy/install.sh", "deploy/steps.sh", "pyproject.toml"):
        (checkout / name).write_text((REPO / name).read_text())
    shims = tmp_path / "shims"
    shims.mkdir()
    for name, text in SHIMS.items():
        (shims / name).write_text(text)
        (shims / name).chmod(0o755)
    python = tmp_path / "venv/bin/python"
    python.parent.mkdir(parents=True)
    python.write_text(VENV_PYTHON)
    python.chmod(0o755)
    return checkout


def install(
    tmp_path: Path, fail_pip: bool = False, dev: bool = True
) -> subprocess.CompletedProcess[str]:
    env = {
        "PATH": f"{tmp_path / 'shims'}:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "FERRY_ZFS": "kernel",
        "FERRY_VENV": str(tmp_path / "venv"),
        "FERRY_BIN_DIR": str(tmp_path / "bin"),
        "FERRY_INSTALL_LOG": str(tmp_path / "install.log"),
        "SANDBOX_CALLS": str(tmp_path / "calls"),
        **({"FAIL_PIP": "1"} if fail_pip else {}),
    }
    return subprocess.run(
        ["bash", str(tmp_path / "checkout/deploy/install.sh"), *(["--dev"] if dev else [])],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def calls(tmp_path: Path) -> list[str]:
    """What the sandbox's apt-get and venv python were asked since the last call."""
    path = tmp_path / "calls"
    found = path.read_text().splitlines() if path.exists() else []
    path.unlink(missing_ok=True)
    return found


def test_a_second_install_with_nothing_changed_runs_no_pip_and_no_apt(tmp_path: Path) -> None:
    checkout = sandbox(tmp_path)
    first = install(tmp_path)
    assert first.returncode == 0, first.stderr
    assert f"python -m pip install -e {checkout}[dev]" in calls(tmp_path)

    second = install(tmp_path)
    assert second.returncode == 0, second.stderr
    assert calls(tmp_path) == []
    assert "installed from this checkout already, pyproject.toml unchanged" in second.stderr
    assert os.readlink(tmp_path / "bin/ferryctl") == str(tmp_path / "venv/bin/ferryctl")


def test_a_changed_pyproject_installs_again(tmp_path: Path) -> None:
    checkout = sandbox(tmp_path)
    assert install(tmp_path).returncode == 0
    calls(tmp_path)
    pyproject = checkout / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace('"click>=8.1,<9",', '"click>=8.2,<9",'))

    again = install(tmp_path)
    assert again.returncode == 0, again.stderr
    assert f"python -m pip install -e {checkout}[dev]" in calls(tmp_path)


def test_a_failed_pip_install_is_tried_again_by_the_next_run(tmp_path: Path) -> None:
    checkout = sandbox(tmp_path)
    assert install(tmp_path).returncode == 0
    (checkout / "pyproject.toml").write_text(
        (checkout / "pyproject.toml").read_text() + "\n# changed\n"
    )
    failed = install(tmp_path, fail_pip=True)
    assert failed.returncode == 1
    calls(tmp_path)

    retried = install(tmp_path)
    assert retried.returncode == 0, retried.stderr
    assert f"python -m pip install -e {checkout}[dev]" in calls(tmp_path)


def test_a_node_install_without_dev_tools_installs_ferry_and_its_commands(
    tmp_path: Path,
) -> None:
    """What the demo and a real node run (no --dev): it once stopped silently after the
    zfs-fuse step, exit status 1, with nothing installed."""
    checkout = sandbox(tmp_path)
    plain = install(tmp_path, dev=False)
    assert plain.returncode == 0, plain.stderr
    assert f"python -m pip install -e {checkout}" in calls(tmp_path)
    assert "ferry installed in" in plain.stderr
    assert os.readlink(tmp_path / "bin/ferry-agent") == str(tmp_path / "venv/bin/ferry-agent")
