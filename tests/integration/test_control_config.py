"""Where ferry-control and ferryctl take their settings from, on a real etcd.

ferryctl: flags beat ``FERRY_*`` variables, which beat the config file.
ferry-control runs from environment variables alone, and says loudly when
it runs without TLS.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.support.etcd import (
    ClusterCerts,
    ControlServer,
    EtcdServer,
    ferryctl,
    free_port,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def home(control: ControlServer, tmp_path: Path) -> Path:
    """A HOME whose ~/.config/ferry/ferryctl.yaml points at the running control."""
    tls = control.certs.admin
    config = tmp_path / ".config" / "ferry" / "ferryctl.yaml"
    config.parent.mkdir(parents=True)
    settings = {
        "control": control.address,
        "tls_ca": str(tls.ca),
        "tls_cert": str(tls.cert),
        "tls_key": str(tls.key),
    }
    config.write_text(yaml.safe_dump(settings))
    return tmp_path


def bare_env(home: Path) -> dict[str, str]:
    return {"PATH": "/opt/ferry/venv/bin:/usr/bin:/bin", "HOME": str(home)}


def dead_address() -> str:
    return f"127.0.0.1:{free_port()}"


def one_line_error(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


async def test_the_config_file_alone_is_enough(home: Path) -> None:
    listed = await ferryctl(bare_env(home), "node", "list", "-o", "json")
    assert listed.code == 0, listed.stderr


async def test_the_environment_beats_the_config_file(home: Path) -> None:
    env = {**bare_env(home), "FERRY_CONTROL": dead_address()}
    listed = await ferryctl(env, "node", "list")
    assert listed.code != 0
    assert "cannot reach ferry-control" in one_line_error(listed.stderr)


async def test_a_flag_beats_the_environment(home: Path, control: ControlServer) -> None:
    env = {**bare_env(home), "FERRY_CONTROL": dead_address()}
    listed = await ferryctl(env, "--control", control.address, "node", "list")
    assert listed.code == 0, listed.stderr


async def test_an_explicit_config_file_that_is_missing_is_an_error(home: Path) -> None:
    missing = home / "nowhere.yaml"
    listed = await ferryctl(bare_env(home), "--config", str(missing), "node", "list")
    assert listed.code != 0
    assert one_line_error(listed.stderr) == f"ferryctl: config file {missing} does not exist"


@pytest.mark.parametrize(
    ("text", "message"),
    [("control: [unclosed\n", "is not valid YAML"), ("controll: x\n", "unknown key(s) controll")],
)
async def test_a_bad_config_file_is_refused_with_what_is_wrong(
    home: Path, text: str, message: str
) -> None:
    (home / ".config" / "ferry" / "ferryctl.yaml").write_text(text)
    listed = await ferryctl(bare_env(home), "node", "list")
    assert listed.code != 0
    assert message in listed.stderr
    assert listed.stderr.startswith("ferryctl: config file ")


async def test_insecure_control_from_the_environment_warns_and_serves_insecure_clients(
    certs: ClusterCerts, workdir: Path
) -> None:
    with (
        EtcdServer(secure=False) as plaintext,
        ControlServer(plaintext.endpoint, certs, workdir, insecure=True) as insecure,
    ):
        assert "INSECURE MODE" in insecure.log_path.read_text()
        plain = await ferryctl(insecure.ferryctl_env(), "node", "list", "-o", "json")
        assert plain.code == 0, plain.stderr
        over_tls = await ferryctl(insecure.ferryctl_env(certs.admin), "node", "list")
        assert over_tls.code != 0
        assert "cannot reach ferry-control" in one_line_error(over_tls.stderr)


async def test_without_tls_files_or_insecure_ferryctl_says_what_to_give(
    control: ControlServer, tmp_path: Path
) -> None:
    env = {**bare_env(tmp_path), "FERRY_CONTROL": control.address}
    listed = await ferryctl(env, "node", "list")
    assert listed.code != 0
    assert "--tls-ca, --tls-cert and --tls-key" in one_line_error(listed.stderr)
