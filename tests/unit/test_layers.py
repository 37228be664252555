"""Dependencies point one way: core, then security and cluster, then agent and control.

Read from every module's imports (``ast``), so a new upward import fails
here before it tangles the packages.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.modules import REPO, imports, project_modules, within

# What each layer may import from the project (a prefix match on module names).
ALLOWED = {
    "ferry.core": ("ferry.core",),
    "ferry.security": ("ferry.core", "ferry.security"),
    "ferry.cluster": ("ferry.core", "ferry.security", "ferry.cluster"),
    # deploy/local-cluster: runs the Ferry programs as subprocesses, imports none of them.
    "ferry.localcluster": ("ferry.core", "ferry.security", "ferry.localcluster"),
    "ferry": ("ferry",),
    "control": ("ferry", "control", "protos"),
    "agent": ("ferry", "agent", "protos"),
}
PROJECT = ("agent", "control", "ferry", "protos")
# The core computes; it never reaches outside the process.
CORE_FORBIDDEN = ("asyncio", "socket", "subprocess", "aetcd", "grpc", "docker", "os", "pathlib")


def _layer(module: str) -> str:
    return max((layer for layer in ALLOWED if within(module, layer)), key=len)


MODULES = project_modules()


def test_every_package_is_found() -> None:
    layers = {_layer(name) for name, _ in MODULES}
    assert layers == set(ALLOWED)


@pytest.mark.parametrize(("module", "path"), MODULES, ids=[m for m, _ in MODULES])
def test_imports_point_down(module: str, path: Path) -> None:
    allowed = ALLOWED[_layer(module)]
    upward = sorted(
        name
        for name in imports(path)
        if any(within(name, top) for top in PROJECT) and not any(within(name, ok) for ok in allowed)
    )
    assert not upward, f"{module} imports {upward}; it may import only {allowed}"


@pytest.mark.parametrize(
    ("module", "path"),
    [(m, p) for m, p in MODULES if within(m, "ferry.core")],
    ids=[m for m, _ in MODULES if within(m, "ferry.core")],
)
def test_core_does_no_io(module: str, path: Path) -> None:
    reaching = sorted(
        name for name in imports(path) if any(within(name, bad) for bad in CORE_FORBIDDEN)
    )
    assert not reaching, f"{module} imports {reaching}: the core does no I/O"


def _test_modules() -> list[tuple[str, Path]]:
    return [
        (".".join(path.relative_to(REPO).with_suffix("").parts), path)
        for path in sorted((REPO / "tests").rglob("*.py"))
    ]


def test_tests_take_their_helpers_from_support_not_from_other_tests() -> None:
    """A helper in a test module is imported by pytest's collection of that module too, and
    moving or renaming a test breaks its neighbours: shared helpers live in tests/support."""
    from_tests = {
        module: sorted(
            name for name in imports(path) if name.startswith("tests.") and ".test_" in name
        )
        for module, path in _test_modules()
    }
    assert {module: names for module, names in from_tests.items() if names} == {}
