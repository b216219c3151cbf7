"""The coordinator's broker TLS files are loaded when its configuration is: a CA that is not a
certificate, a key that is not the certificate's, or half a client certificate is a config
error (exit 3) naming the file, not a connection retried for ever."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
import tomli_w
from click.testing import CliRunner
from fedgate_common.errors import BrokerTlsInvalid
from fedgate_coordinator.broker_config import BrokerAuthority
from fedgate_coordinator.cli import ExitCode, main
from fedgate_coordinator.config import (
    CoordinatorConfig,
    FederationSettings,
    PeerBroker,
    validate,
)
from fedgate_coordinator.mqtt_link import MqttLink, MqttSettings


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, str]:
    """A broker CA and a client certificate it issued, plus files that do not load."""
    directory = tmp_path / "pki"
    ca = BrokerAuthority(directory, deployment="plant", cloud="c1")
    ca.load_or_create()
    client = Path(ca.issue_client(directory, "coordinator", rotate=False).directory)
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    return {
        "ca": str(directory / "ca.pem"),
        "cert": str(client / "client.pem"),
        "key": str(client / "client.key"),
        "other_key": str(directory / "ca.key"),  # a key, but not the client certificate's
        "junk": str(junk),
    }


def peer_problems(login: PeerBroker) -> list[str]:
    config = CoordinatorConfig(
        deployment="plant",
        cloud="c1",
        database_url="sqlite://",
        federation=FederationSettings(peers={"c2": login}),
    )
    return validate(config)


def test_loadable_tls_files_are_no_problem(pki: dict[str, str]) -> None:
    assert peer_problems(PeerBroker(tls_ca_file=pki["ca"])) == []
    assert (
        peer_problems(
            PeerBroker(tls_ca_file=pki["ca"], tls_cert_file=pki["cert"], tls_key_file=pki["key"])
        )
        == []
    )


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"tls_ca_file": "junk"}, "federation.peers.c2: cannot load the CA file {junk}"),
        (
            {"tls_ca_file": "ca", "tls_cert_file": "cert", "tls_key_file": "other_key"},
            "federation.peers.c2: cannot load the client certificate {cert} with key {other_key}",
        ),
        (
            {"tls_ca_file": "ca", "tls_key_file": "key"},
            "federation.peers.c2: set both tls_cert_file and tls_key_file",
        ),
        (
            {"tls_ca_file": "ca", "tls_cert_file": "cert"},
            "federation.peers.c2: set both tls_cert_file and tls_key_file",
        ),
        (
            {"tls_key_file": "key"},
            "federation.peers.c2.tls_cert_file/tls_key_file need federation.peers.c2.tls_ca_file",
        ),
    ],
)
def test_tls_files_that_do_not_load_or_pair_are_problems(
    pki: dict[str, str], files: dict[str, str], expected: str
) -> None:
    login = PeerBroker(**{name: pki[which] for name, which in files.items()})
    problems = peer_problems(login)
    assert len(problems) == 1, problems
    assert problems[0].startswith(expected.format(**pki)), problems


def test_a_missing_file_is_reported_once_without_loading_the_rest(
    pki: dict[str, str], tmp_path: Path
) -> None:
    missing = str(tmp_path / "gone.pem")
    problems = peer_problems(PeerBroker(tls_ca_file=missing))
    assert problems == [f"federation.peers.c2.tls_ca_file={missing!r}: no such file"]
    # A missing password file does not stop the TLS files from being loaded and checked.
    problems = peer_problems(PeerBroker(password_file=missing, tls_ca_file=pki["junk"]))
    assert problems[0] == f"federation.peers.c2.password_file={missing!r}: no such file"
    assert problems[1].startswith(f"federation.peers.c2: cannot load the CA file {pki['junk']}")
    assert len(problems) == 2, problems


def test_serve_with_a_ca_that_does_not_load_exits_config_before_connecting(
    pki: dict[str, str], tmp_path: Path
) -> None:
    state_dir = tmp_path / "coord"
    runner = CliRunner()
    init = runner.invoke(
        main,
        [
            "--state-dir",
            str(state_dir),
            "init",
            "--cloud",
            "c1",
            "--db",
            f"sqlite:///{tmp_path}/c.db",
        ],
    )
    assert init.exit_code == 0, init.output
    config_file = state_dir / "coordinator.toml"
    config = tomllib.loads(config_file.read_text())
    config["broker"]["tls_ca_file"] = pki["junk"]
    config["broker"]["port"] = 1  # nothing listens there: serve must not get as far
    config_file.write_text(tomli_w.dumps(config))

    result = runner.invoke(main, ["--state-dir", str(state_dir), "serve"])

    assert result.exit_code == ExitCode.CONFIG, result.output
    assert f"broker: cannot load the CA file {pki['junk']}" in result.output


def test_an_mqtt_link_loads_its_tls_files_when_it_is_made(pki: dict[str, str]) -> None:
    good = MqttLink(settings=MqttSettings(tls_ca_file=pki["ca"]), subscriptions=[])
    assert good._tls is not None
    assert good._tls.check_hostname
    with pytest.raises(BrokerTlsInvalid, match="cannot load the CA file"):
        MqttLink(settings=MqttSettings(tls_ca_file=pki["junk"]), subscriptions=[])
