"""The bridge publishes over TLS with a client certificate, against a real Mosquitto that
requires one; wrong CAs, missing certificates and half-configured TLS are refused."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from fedgate_bridge.config import BrokerSettings, tls_problems
from fedgate_coordinator.broker_config import BrokerAuthority

from tests.bridge.bridge_support import publish_five
from tests.mosquitto_support import Mosquitto


def authority(directory: Path) -> BrokerAuthority:
    ca = BrokerAuthority(directory, deployment="plant-a", cloud="site-broker")
    ca.load_or_create()
    return ca


@pytest.fixture
def tls_broker(tmp_path: Path) -> tuple[Mosquitto, Path]:
    pki = tmp_path / "pki"
    ca = authority(pki)
    ca.issue_server(pki, ["127.0.0.1"], rotate=False)
    ca.issue_client(pki, "bridge-1", rotate=False)
    broker = Mosquitto(
        tmp_path / "broker",
        extra=(
            f"cafile {pki / 'ca.pem'}\ncertfile {pki / 'server.pem'}\n"
            f"keyfile {pki / 'server.key'}\nrequire_certificate true\n"
            "use_identity_as_username true\n"
        ),
    )
    return broker, pki


async def test_publishing_over_tls_with_a_client_certificate(
    tmp_path: Path, tls_broker: tuple[Mosquitto, Path]
) -> None:
    broker, pki = tls_broker
    client = pki / "clients" / "bridge-1"
    good = BrokerSettings(
        host="127.0.0.1",
        port=broker.port,
        tls_ca_file=str(pki / "ca.pem"),
        tls_cert_file=str(client / "client.pem"),
        tls_key_file=str(client / "client.key"),
    )
    other = authority(tmp_path / "other-pki")  # a CA the broker's certificate is not from
    other_client = other.issue_client(tmp_path / "other-pki", "bridge-1", rotate=False)
    wrong_ca = BrokerSettings(
        host="127.0.0.1",
        port=broker.port,
        tls_ca_file=str(tmp_path / "other-pki" / "ca.pem"),
        tls_cert_file=str(client / "client.pem"),
        tls_key_file=str(client / "client.key"),
    )
    foreign_cert = BrokerSettings(
        host="127.0.0.1",
        port=broker.port,
        tls_ca_file=str(pki / "ca.pem"),
        tls_cert_file=str(Path(other_client.directory) / "client.pem"),
        tls_key_file=str(Path(other_client.directory) / "client.key"),
    )
    no_cert = BrokerSettings(host="127.0.0.1", port=broker.port, tls_ca_file=str(pki / "ca.pem"))
    plaintext = BrokerSettings(host="127.0.0.1", port=broker.port)
    await asyncio.to_thread(broker.start)
    try:
        outcomes = {
            name: await publish_five(
                tmp_path / f"{name.replace(' ', '-')}.db",
                settings,
                client_id=f"tls-{name.replace(' ', '-')}",
            )
            for name, settings in [
                ("good", good),
                ("wrong CA", wrong_ca),
                ("certificate from another CA", foreign_cert),
                ("no client certificate", no_cert),
                ("plaintext", plaintext),
            ]
        }
    finally:
        broker.stop()
    good_counters, good_waiting = outcomes["good"]
    assert (good_counters.acked, good_waiting, good_counters.connect_failures) == (5, 0, 0)
    for name in ("wrong CA", "certificate from another CA", "no client certificate", "plaintext"):
        counters, waiting = outcomes[name]
        assert counters.acked == 0, name
        assert counters.connects == 0, name
        assert counters.connect_failures >= 2, name
        assert waiting == 5, name  # nothing lost: all still in the outbox
        assert counters.last_error, name
    assert "CERTIFICATE_VERIFY_FAILED" in outcomes["wrong CA"][0].last_error


def test_half_configured_tls_is_a_config_problem(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    ca = authority(pki)
    client = Path(ca.issue_client(pki, "bridge-1", rotate=False).directory)
    cert, key = str(client / "client.pem"), str(client / "client.key")

    def problems(**tls: str) -> str:
        return " ".join(tls_problems(BrokerSettings(**tls)))  # type: ignore[arg-type]

    assert problems(tls_ca_file=str(pki / "ca.pem"), tls_cert_file=cert, tls_key_file=key) == ""
    assert "set both or neither" in problems(tls_ca_file=str(pki / "ca.pem"), tls_cert_file=cert)
    assert "need broker.tls_ca_file" in problems(tls_cert_file=cert, tls_key_file=key)
    assert "cannot be read" in problems(tls_ca_file=str(tmp_path / "missing.pem"))
    mismatched = str(pki / "ca.key")  # a key that is not the certificate's
    assert f"broker: cannot load the client certificate {cert} with key {mismatched}" in problems(
        tls_ca_file=str(pki / "ca.pem"), tls_cert_file=cert, tls_key_file=mismatched
    )
    not_a_ca = tmp_path / "not-a-ca.pem"
    not_a_ca.write_text("not a certificate\n")
    assert f"broker: cannot load the CA file {not_a_ca}" in problems(tls_ca_file=str(not_a_ca))
