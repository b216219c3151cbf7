"""`fedgate-coordinator broker-config` and agent-id checks at enrollment, without a broker
(tests/integration/test_broker_acl.py starts Mosquitto with the output)."""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

import nacl.signing
import numpy as np
import pytest
from click.testing import CliRunner, Result
from cryptography import x509
from fedgate_common.arrays import encode_array, encode_arrays
from fedgate_common.envelope import seal
from fedgate_common.errors import InvalidIdentifier
from fedgate_common.keys import public_key_text
from fedgate_common.limits import DEFAULT_LIMITS
from fedgate_common.messages import MaskedInput, ModelUpdate
from fedgate_common.model_spec import DEFAULT_MODEL, ModelSpec, initial_weights, parameter_count
from fedgate_coordinator.broker_config import size_plan
from fedgate_coordinator.cli import ExitCode, main
from fedgate_coordinator.genesis import genesis_record
from fedgate_coordinator.store import Store

LONG_ID = "s" * 64  # the longest id: the worst case for every envelope


def invoke(state: Path, *args: str) -> Result:
    return CliRunner().invoke(main, ["--state-dir", str(state), *args])


def new_key() -> str:
    return public_key_text(nacl.signing.SigningKey.generate().verify_key)


@pytest.fixture
def state(tmp_path: Path) -> Path:
    state = tmp_path / "coord"
    assert invoke(state, "init", "--cloud", "cloud-1", "--deployment", "plant-a").exit_code == 0
    for agent in ("site-1", "site-2"):
        assert invoke(state, "enroll", agent, new_key()).exit_code == 0
    return state


def broker_config(state: Path, out: Path, *extra: str) -> dict[str, Any]:
    result = invoke(
        state, "broker-config", "--out", str(out), "--persistence-dir", str(out.parent / "p"),
        "--json", *extra,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    data: dict[str, Any] = json.loads(result.stdout)
    return data


# -- sizes ----------------------------------------------------------------------------------


@pytest.mark.parametrize("word_bits", [16, 32])
def test_real_messages_fit_the_planned_sizes(word_bits: int) -> None:
    spec = DEFAULT_MODEL
    plan = size_plan(spec, word_bits=word_bits, max_agents=100, clouds=4)
    key = nacl.signing.SigningKey.generate()
    ids = {"deployment": LONG_ID, "cloud": LONG_ID, "sender": LONG_ID}
    weights = initial_weights(spec, np.random.default_rng(1))
    update = ModelUpdate(
        round=2**40,
        base_digest="f" * 64,
        delta=encode_arrays({k: v.astype(np.float32) for k, v in weights.items()}),
        num_samples=10**9,
        train_loss=1.5,
    )
    assert len(seal(update, signing_key=key, **ids)) <= plan.model_message_bytes
    genesis = genesis_record(spec, 3)
    assert len(genesis.weights) <= plan.model_message_bytes  # what GlobalModel carries
    dtype = np.uint16 if word_bits == 16 else np.uint32
    words = np.zeros(parameter_count(spec) + 2, dtype=dtype)
    masked = MaskedInput(round=2**40, roster_digest=b"r" * 32, words=encode_array("masked", words))
    assert len(seal(masked, signing_key=key, **ids)) <= plan.masked_input_bytes
    # The limit: twice the largest, and never above what receivers accept anyway.
    assert plan.message_size_limit >= 2 * plan.largest_message_bytes
    assert plan.message_size_limit <= DEFAULT_LIMITS.max_message_bytes
    assert plan.max_packet_size > plan.message_size_limit
    assert plan.largest_message == "unmask_request"  # n² ids at n = 100 (protocol.md §9.7)


def test_sizes_follow_the_model_clouds_and_agents() -> None:
    small = ModelSpec(n_features=3, window=8, n_classes=2, channels=4)
    assert size_plan(small, word_bits=16, max_agents=2, clouds=1).message_size_limit == 2**20
    big = ModelSpec(n_features=52, window=20, n_classes=22, channels=256)
    one = size_plan(big, word_bits=16, max_agents=10, clouds=1)
    seven = size_plan(big, word_bits=16, max_agents=10, clouds=7)
    assert one.largest_message == seven.largest_message == "proposal"  # the aggregates
    assert one.message_size_limit < 3 * one.model_message_bytes
    assert seven.message_size_limit > 6 * one.model_message_bytes
    many = size_plan(DEFAULT_MODEL, word_bits=16, max_agents=5000, clouds=1)
    assert many.message_size_limit == DEFAULT_LIMITS.max_message_bytes  # capped


# -- the command ----------------------------------------------------------------------------


def test_writes_a_locked_down_config_and_keeps_keys_on_rerun(state: Path, tmp_path: Path) -> None:
    out = tmp_path / "broker"
    first = broker_config(state, out, "--peer", "cloud-2", "--host", "broker.example")
    assert first["ca_created"] is True
    assert first["users"] == ["coordinator:cloud-1", "peer:cloud-2", "site-1", "site-2"]
    assert "largest legitimate message" in first["sizes"]["computation"]
    conf = (out / "mosquitto.conf").read_text()
    assert [line for line in conf.splitlines() if line.startswith("listener")] == [
        "listener 8883 0.0.0.0"
    ]
    for line in (
        "allow_anonymous false",
        "require_certificate true",
        "use_identity_as_username true",
        "persistence true",
        f"message_size_limit {first['sizes']['message_size_limit']}",
        f"max_packet_size {first['sizes']['max_packet_size']}",
    ):
        assert line in conf.splitlines()
    acl = (out / "fedgate.acl").read_text()
    assert "pattern write fedgate/plant-a/cloud-1/round/+/masked/%u" in acl
    assert "pattern write fedgate/plant-a/cloud-1/round/+/deliver/%u" not in acl
    assert "user peer:cloud-2\ntopic read fedgate/plant-a/federation/cloud-1/#" in acl
    # Private keys are 0600, the broker's key 0640 (its group), nothing world-readable.
    for key in [out / "ca.key", *out.glob("clients/*/client.key")]:
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    assert stat.S_IMODE((out / "server.key").stat().st_mode) == 0o640
    server = x509.load_pem_x509_certificate((out / "server.pem").read_bytes())
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "broker.example" in names.get_values_for_type(x509.DNSName)
    agent = x509.load_pem_x509_certificate((out / "clients/site-1/client.pem").read_bytes())
    assert agent.subject.rfc4514_string() == "CN=site-1"

    before = {p: p.read_bytes() for p in out.rglob("*.pem") if p.name != "crl.pem"}
    again = broker_config(state, out, "--peer", "cloud-2", "--host", "broker.example")
    assert again["ca_created"] is False
    assert not [c for c in again["clients"] if c["issued"]]
    assert {p: p.read_bytes() for p in before} == before

    server_pem = (out / "server.pem").read_bytes()
    more = broker_config(state, out, "--peer", "cloud-2", "--host", "broker2.example")
    assert more["server_certificate_issued"] is True  # a new name: a new server certificate
    assert (out / "server.pem").read_bytes() != server_pem
    assert (out / "ca.pem").read_bytes() == before[out / "ca.pem"]

    rotated = broker_config(state, out, "--rotate")
    assert rotated["ca_created"] is True
    assert (out / "ca.pem").read_bytes() != before[out / "ca.pem"]
    assert all(c["issued"] for c in rotated["clients"])


def test_reissue_and_revoke_go_to_the_crl(state: Path, tmp_path: Path) -> None:
    out = tmp_path / "broker"
    broker_config(state, out)

    def serial(user: str) -> int:
        path = out / "clients" / user / "client.pem"
        return x509.load_pem_x509_certificate(path.read_bytes()).serial_number

    def revoked() -> set[int]:
        crl = x509.load_pem_x509_crl((out / "crl.pem").read_bytes())
        return {entry.serial_number for entry in crl}

    assert revoked() == set()
    old = serial("site-1")
    report = broker_config(state, out, "--reissue", "site-1")
    assert serial("site-1") != old
    assert revoked() == {old}
    assert report["revoked_certificates"] == 1
    site2 = serial("site-2")
    assert invoke(state, "revoke", "site-2").exit_code == 0
    report = broker_config(state, out)
    assert revoked() == {old, site2}
    assert "site-2" not in report["users"]
    assert report["revoked_agents"] == ["site-2"]


def test_dry_run_writes_nothing(state: Path, tmp_path: Path) -> None:
    out = tmp_path / "broker"
    result = invoke(state, "broker-config", "--out", str(out), "--dry-run")
    assert result.exit_code == 0, result.output
    assert "allow_anonymous false" in result.output
    assert not out.exists()


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (["--peer", "cloud/2"], ExitCode.USAGE),
        (["--reader", "a+b"], ExitCode.USAGE),
        (["--reissue", "site-9"], ExitCode.CONFIG),
        (["--port", "0"], ExitCode.USAGE),
        (["--host", "broker example"], ExitCode.USAGE),
        (["--bind", "0.0.0.0\nlistener 1883"], ExitCode.CONFIG),
        (["--persistence-dir", "/tmp/with space"], ExitCode.CONFIG),
        (["--broker-user", "root\nallow_anonymous true"], ExitCode.CONFIG),
    ],
)
def test_bad_options_exit_with_documented_codes(
    state: Path, tmp_path: Path, args: list[str], code: int
) -> None:
    result = invoke(state, "broker-config", "--out", str(tmp_path / "b"), *args)
    assert result.exit_code == code, result.output
    assert not (tmp_path / "b" / "mosquitto.conf").exists()


def test_a_broker_user_this_machine_lacks_is_warned_about(state: Path, tmp_path: Path) -> None:
    missing = "fedgate-no-such-user"
    result = invoke(
        state, "broker-config", "--out", str(tmp_path / "b"), "--persistence-dir",
        str(tmp_path / "p"), "--broker-user", missing, "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    (warning,) = json.loads(result.stdout)["warnings"]
    assert f"--broker-user {missing!r} does not exist on this machine" in warning
    assert f"warning: {warning}" in result.stderr
    assert f"user {missing}" in (tmp_path / "b" / "mosquitto.conf").read_text()
    assert broker_config(state, tmp_path / "c")["warnings"] == []  # mosquitto exists here


def test_a_damaged_ca_is_a_config_error(state: Path, tmp_path: Path) -> None:
    out = tmp_path / "broker"
    broker_config(state, out)
    (out / "ca.key").write_text("not a key")
    result = invoke(state, "broker-config", "--out", str(out))
    assert result.exit_code == ExitCode.CONFIG
    assert "--rotate" in result.output


@pytest.mark.parametrize("lost", [["ca.key"], ["ca.pem"], ["ca.key", "ca.pem"]])
def test_a_lost_ca_file_is_refused_not_replaced(
    state: Path, tmp_path: Path, lost: list[str]
) -> None:
    out = tmp_path / "broker"
    broker_config(state, out)
    client = (out / "clients" / "site-1" / "client.pem").read_bytes()
    for name in lost:
        (out / name).unlink()
    result = invoke(state, "broker-config", "--out", str(out))
    assert result.exit_code == ExitCode.CONFIG, result.output
    assert "missing" in result.output
    assert "--rotate" in result.output
    assert (out / "clients" / "site-1" / "client.pem").read_bytes() == client
    assert all(not (out / name).exists() for name in lost)
    assert broker_config(state, out, "--rotate")["ca_created"] is True


def test_a_lost_revocation_list_is_refused_not_emptied(state: Path, tmp_path: Path) -> None:
    out = tmp_path / "broker"
    broker_config(state, out)
    assert invoke(state, "revoke", "site-2").exit_code == 0
    broker_config(state, out)
    crl = (out / "crl.pem").read_bytes()
    (out / "revoked-serials.txt").unlink()
    result = invoke(state, "broker-config", "--out", str(out))
    assert result.exit_code == ExitCode.CONFIG, result.output
    assert "revoked-serials.txt is missing" in result.output
    assert (out / "crl.pem").read_bytes() == crl


def test_help_has_an_example_and_exit_codes() -> None:
    result = CliRunner().invoke(main, ["broker-config", "--help"])
    assert result.exit_code == 0
    assert "Example:" in result.output
    assert "Exit codes:" in result.output


# -- agent ids at enrollment ------------------------------------------------------------------

BAD_IDS = [
    "",
    "site/1",
    "site+1",
    "site#",
    "+",
    "#",
    "a\x00b",
    "a\nb",
    "tab\tx",
    "\x7f",
    " site",
    "coordinator:cloud-1",  # would take the coordinator's broker identity
    "x" * 65,
    "sité",
]


@pytest.mark.parametrize("agent_id", BAD_IDS)
def test_enroll_refuses_ids_unsafe_in_topics(state: Path, agent_id: str) -> None:
    result = invoke(state, "enroll", agent_id, new_key())
    assert result.exit_code == ExitCode.USAGE, result.output
    assert "invalid agent id" in result.output
    with Store.open(f"sqlite:///{state / 'coordinator.db'}") as store:
        assert agent_id not in {a.agent_id for a in store.list_agents()}
        with pytest.raises(InvalidIdentifier):  # the store refuses it on its own too
            store.enroll_agent(agent_id, new_key())


def test_enroll_accepts_the_longest_valid_id(state: Path) -> None:
    assert invoke(state, "enroll", "x" * 64, new_key()).exit_code == 0


@pytest.mark.parametrize(
    "key",
    ["ed25519:" + "00" * 32, "ed25519:01" + "00" * 31, "ed25519:ec" + "ff" * 30 + "7f"],
    ids=["all-zero", "identity", "order-2"],
)
def test_enroll_refuses_small_order_keys_like_other_malformed_keys(state: Path, key: str) -> None:
    malformed = invoke(state, "enroll", "site-3", "ed25519:zz")
    result = invoke(state, "enroll", "site-3", key)
    assert result.exit_code == malformed.exit_code == ExitCode.USAGE, result.output
    assert "small-order point" in result.output
    with Store.open(f"sqlite:///{state / 'coordinator.db'}") as store:
        assert "site-3" not in {a.agent_id for a in store.list_agents()}


def test_enroll_issues_the_broker_login_at_once(state: Path, tmp_path: Path) -> None:
    out = tmp_path / "broker"
    no_ca = invoke(state, "enroll", "site-3", new_key(), "--broker-out", str(out))
    assert no_ca.exit_code == ExitCode.CONFIG, no_ca.output
    assert "run `fedgate-coordinator broker-config --out" in no_ca.output
    with Store.open(f"sqlite:///{state / 'coordinator.db'}") as store:
        assert "site-3" not in {a.agent_id for a in store.list_agents()}  # nothing half-done
    broker_config(state, out)
    result = invoke(state, "enroll", "site-3", new_key(), "--broker-out", str(out), "--json")
    assert result.exit_code == 0, result.output
    login = json.loads(result.output)["broker_login"]
    assert login["issued"] is True
    client = Path(login["directory"])
    assert client == out / "clients" / "site-3"
    cert = x509.load_pem_x509_certificate((client / "client.pem").read_bytes())
    ca = x509.load_pem_x509_certificate((out / "ca.pem").read_bytes())
    assert cert.subject.rfc4514_string() == "CN=site-3"
    cert.verify_directly_issued_by(ca)
    assert stat.S_IMODE((client / "client.key").stat().st_mode) == 0o600
    # broker-config later keeps it: the login issued at enrollment stays valid.
    again = broker_config(state, out)
    site3 = next(c for c in again["clients"] if c["user"] == "site-3")
    assert site3["issued"] is False


# -- rate-limit drops in `status` ---------------------------------------------------------


def test_status_shows_the_rate_limited_senders(state: Path) -> None:
    assert "rate limit no drops" in invoke(state, "status").output
    (state / "intake-status.json").write_text(
        json.dumps({"updated": 1.0, "rate_limited": {"site-2": 312, "*": 4}})
    )
    assert "rate limit *=4, site-2=312" in invoke(state, "status").output
    data = json.loads(invoke(state, "status", "--json").output)
    assert data["rate_limited"] == {"site-2": 312, "*": 4}
    (state / "intake-status.json").write_text("{not json")
    assert json.loads(invoke(state, "status", "--json").output)["rate_limited"] == {}
