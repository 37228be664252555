"""The locally built images: built and cached by deploy/images/build.sh, and usable."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.docker_daemon import DockerDaemon
from tests.support.pgworkload import psql, wait_ready

pytestmark = pytest.mark.integration

POSTGRES = "ferry/postgres:15"
TOOLBOX = "ferry/toolbox"


@pytest.fixture(scope="module")
def daemon() -> Iterator[DockerDaemon]:
    with DockerDaemon(prefix="im") as daemon:
        daemon.load_images(POSTGRES)
        yield daemon


def test_second_build_reuses_the_cached_root_filesystem(
    daemon: DockerDaemon, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    cold = daemon.load_images(TOOLBOX, cache_dir=cache)
    assert "built root filesystem" in cold
    (tarball,) = cache.glob("toolbox-*.tar")
    built_at = tarball.stat().st_mtime_ns

    daemon.client.images.remove(TOOLBOX, force=True)
    started = time.monotonic()
    cached = daemon.load_images(TOOLBOX, cache_dir=cache)
    seconds = time.monotonic() - started

    assert "cached root filesystem" in cached
    assert "built root filesystem" not in cached
    assert tarball.stat().st_mtime_ns == built_at
    assert seconds < 20, f"a cached build took {seconds:.1f}s"
    assert daemon.client.images.get(TOOLBOX).labels["ferry.image.key"] in tarball.name

    again = daemon.load_images(TOOLBOX, cache_dir=cache)
    assert "already in the daemon" in again


def test_postgres_image_is_small_and_runs_its_entrypoint(daemon: DockerDaemon) -> None:
    image = daemon.client.images.get(POSTGRES)
    config = image.attrs["Config"]
    assert image.attrs["Size"] < 200 * 1024 * 1024, f"image is {image.attrs['Size']} bytes"
    assert config["Entrypoint"] == ["/usr/local/bin/ferry-postgres-entrypoint"]
    assert "PGDATA=/var/lib/postgresql/data" in config["Env"]


def test_postgres_initialises_an_empty_data_dir_and_answers(
    daemon: DockerDaemon, tmp_path: Path
) -> None:
    data = tmp_path / "pgdata"
    data.mkdir()
    container = daemon.client.containers.run(
        POSTGRES,
        name=f"{daemon.name}-pg-init",
        network_mode="none",
        volumes={str(data): {"bind": "/var/lib/postgresql/data", "mode": "rw"}},
        detach=True,
    )
    try:
        wait_ready(container, timeout=60)
        assert psql(container, "SELECT 6 * 7").strip() == "42"
        assert (data / "PG_VERSION").read_text().strip() == "15"
        status = data.stat()
        assert status.st_uid != 0, "the data directory should belong to the postgres user"
        assert status.st_mode & 0o777 == 0o700
    finally:
        container.remove(force=True)


def test_toolbox_writes_a_file_and_checksums_it(daemon: DockerDaemon, tmp_path: Path) -> None:
    daemon.load_images(TOOLBOX)
    shared = tmp_path / "shared"
    shared.mkdir()
    output = daemon.client.containers.run(
        TOOLBOX,
        ["sh", "-c", "head -c 1048576 /dev/urandom > /data/blob && sync && sha256sum /data/blob"],
        network_mode="none",
        volumes={str(shared): {"bind": "/data", "mode": "rw"}},
        remove=True,
    )
    checksum = output.decode().split()[0]
    blob = shared / "blob"
    assert blob.stat().st_size == 1024 * 1024
    assert hashlib.sha256(blob.read_bytes()).hexdigest() == checksum
    assert os.stat(blob).st_uid == 0
