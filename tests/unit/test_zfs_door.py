"""One door to ZFS: only ``agent/zfs/`` imports libzfs_core or calls ``lzc_*``, and only its
runner starts a process.

Read from every module's source (``ast``) of ``agent``, ``control`` and
``ferry``, like ``test_layers.py``: a side door (a module that receives a
stream with ``lzc_receive`` itself, or runs ``zfs`` with ``subprocess``)
fails here. A process started anywhere else would also escape the runner's
limits, its list of running commands and its observers. The dev cluster
(``ferry.localcluster``) starts the programs and makes its hosts' pools
itself: it is no part of the agent, and may not import ``agent``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.support.modules import imports, project_modules, within

DOOR = "agent.zfs"
# The only modules (and packages) that start processes, and why.
SPAWNS = {
    "agent.zfs.runner": "the one command runner: limits, logging, observers",
    "ferry.localcluster": "the dev cluster: starts etcd, agents and dockerd, makes its pools",
}
SPAWNING_MODULES = ("subprocess", "pty", "multiprocessing")
SPAWNING_CALLS = {
    "os": ("system", "popen", "spawn", "exec", "posix_spawn", "fork"),
    "asyncio": ("create_subprocess_exec", "create_subprocess_shell"),
}


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), str(path))


def _lzc_names(tree: ast.Module) -> list[str]:
    """Every ``lzc_*`` a module names: called, imported or passed on."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id.startswith("lzc_"):
            found.append(f"line {node.lineno}: {node.id}")
        elif isinstance(node, ast.Attribute) and node.attr.startswith("lzc_"):
            found.append(f"line {node.lineno}: .{node.attr}")
        elif isinstance(node, ast.ImportFrom):
            found += [
                f"line {node.lineno}: import {a.name}"
                for a in node.names
                if a.name.startswith("lzc_")
            ]
    return found


def _spawns(path: Path) -> list[str]:
    """Where a module starts a process: an import of a spawning module, a spawning call."""
    found = [
        f"imports {name}"
        for name in sorted(imports(path))
        if any(within(name, module) for module in SPAWNING_MODULES)
    ]
    for node in ast.walk(_tree(path)):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and any(node.attr.startswith(call) for call in SPAWNING_CALLS.get(node.value.id, ()))
        ):
            found.append(f"line {node.lineno}: {node.value.id}.{node.attr}")
    return found


MODULES = project_modules()
OUTSIDE = [(m, p) for m, p in MODULES if not within(m, DOOR)]


@pytest.mark.parametrize(("module", "path"), OUTSIDE, ids=[m for m, _ in OUTSIDE])
def test_nothing_outside_the_door_reaches_libzfs_core(module: str, path: Path) -> None:
    binding = sorted(n for n in imports(path) if within(n, "libzfs_core"))
    assert not binding, f"{module} imports {binding}: only agent/zfs/ may"
    named = _lzc_names(_tree(path))
    assert not named, (
        f"{module} calls the ZFS API itself ({', '.join(named)}): add a PoolRoot or "
        "agent.zfs.streams method and call that"
    )


@pytest.mark.parametrize(("module", "path"), MODULES, ids=[m for m, _ in MODULES])
def test_only_the_runner_starts_processes(module: str, path: Path) -> None:
    if any(within(module, package) for package in SPAWNS):
        return
    spawning = _spawns(path)
    assert not spawning, (
        f"{module} starts processes ({', '.join(spawning)}): run commands through "
        "agent.zfs.runner, which bounds, lists and reports them"
    )


def test_the_scan_sees_the_runner_start_processes() -> None:
    (runner,) = [path for module, path in MODULES if module == "agent.zfs.runner"]
    assert _spawns(runner)


def test_the_scan_sees_a_side_door(tmp_path: Path) -> None:
    side_door = tmp_path / "side_door.py"
    side_door.write_text(
        "import subprocess\nfrom libzfs_core import lzc_receive\n"
        "from agent import zfs\nzfs.lzc_snapshot([b'p/v@s'])\n"
        "subprocess.run(['zfs', 'list'])\nimport os\nos.execvp('zpool', ['zpool'])\n"
    )
    assert "libzfs_core.lzc_receive" in imports(side_door)
    assert len(_lzc_names(_tree(side_door))) == 2
    assert _spawns(side_door) == ["imports subprocess", "line 7: os.execvp"]
