"""`fedgate-agent broker-key`: a key made and kept on the gateway, and a request for it."""

from __future__ import annotations

import json
import stat
from pathlib import Path

from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID
from fedgate_agent.cli import main


def write_config(tmp_path: Path) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(
        f'agent_id = "site-7"\ndeployment = "plant-a"\ncloud = "cloud-1"\n'
        f'state_dir = "{tmp_path / "state"}"\n',
        encoding="utf-8",
    )
    return path


def run(config: Path, *args: str) -> dict[str, object]:
    result = CliRunner().invoke(main, ["broker-key", "--config", str(config), "--json", *args])
    assert result.exit_code == 0, result.output
    data: dict[str, object] = json.loads(result.stdout)
    return data


def test_the_key_is_made_once_and_the_request_names_the_agent(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    first = run(config)
    key_file = tmp_path / "state" / "broker-client.key"
    assert first["key_file"] == str(key_file)
    assert first["key_created"] is True
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    request = x509.load_pem_x509_csr(str(first["csr"]).encode())
    assert request.is_signature_valid
    assert request.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "site-7"
    key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    assert request.public_key() == key.public_key()
    # Again: the same key, a request for it; --new-key rotates.
    again = run(config, "--csr-out", str(tmp_path / "r.csr"))
    assert again["key_created"] is False
    assert again["public_key_sha256"] == first["public_key_sha256"]
    assert (tmp_path / "r.csr").read_text() == again["csr"]
    rotated = run(config, "--new-key")
    assert rotated["key_created"] is True
    assert rotated["public_key_sha256"] != first["public_key_sha256"]


def test_plain_output_is_the_request_and_a_broken_key_is_a_config_error(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    bad = tmp_path / "bad.key"
    bad.write_text("not a key\n")
    result = CliRunner().invoke(main, ["broker-key", "--config", str(config), "--key", str(bad)])
    assert result.exit_code == 3
    assert "cannot read the broker key" in result.output
    assert bad.read_text() == "not a key\n"  # left alone without --new-key
    result = CliRunner().invoke(main, ["broker-key", "--config", str(config)])
    assert result.exit_code == 0
    assert result.stdout.startswith("-----BEGIN CERTIFICATE REQUEST-----")
    assert "broker key made" in result.stderr
