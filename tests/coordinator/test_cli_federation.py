"""`fedgate-coordinator federation`: four coordinators write, sign, verify and install a
manifest through the real command line (click's runner), each with its own state
directory made by `fedgate-coordinator init`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from fedgate_common.consensus.manifest import decode_manifest_file, manifest_digest
from fedgate_common.keys import public_key_text
from fedgate_common.model_spec import DEFAULT_MODEL
from fedgate_coordinator.cli import EXIT_CODES_HELP, ExitCode, main
from fedgate_coordinator.federation_cli import MANIFEST_NAME
from fedgate_coordinator.genesis import genesis_record
from nacl.signing import SigningKey


@dataclass(frozen=True)
class Coordinator:
    cloud: str
    state_dir: Path
    public_key: str

    def run(self, *args: str | Path) -> Result:
        return CliRunner().invoke(
            main, ["--state-dir", str(self.state_dir), "federation", *map(str, args)]
        )

    def run_json(self, *args: str | Path) -> Any:
        result = self.run(*args, "--json")
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    def cloud_option(self) -> str:
        return f"{self.cloud}={self.public_key}@mqtt.{self.cloud}.example:8883"


def make_coordinator(tmp_path: Path, cloud: str, deployment: str = "plant-a") -> Coordinator:
    state_dir = tmp_path / cloud
    result = CliRunner().invoke(
        main,
        [
            "--state-dir",
            str(state_dir),
            "init",
            "--cloud",
            cloud,
            "--deployment",
            deployment,
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    return Coordinator(cloud, state_dir, json.loads(result.stdout)["coordinator_public_key"])


@pytest.fixture
def clouds(tmp_path: Path) -> list[Coordinator]:
    return [make_coordinator(tmp_path, f"cloud-{i}") for i in range(1, 5)]


def write_v1(
    author: Coordinator, members: list[Coordinator], out: Path, *extra: str
) -> dict[str, Any]:
    options = [part for c in members for part in ("--cloud", c.cloud_option())]
    data: dict[str, Any] = author.run_json("init", *options, "--out", out, *extra)
    return data


def sign_all(members: list[Coordinator], path: Path, *extra: str) -> None:
    for member in members:
        result = member.run("sign", path, *extra)
        assert result.exit_code == 0, result.output


def test_four_clouds_init_sign_verify_install_show(
    clouds: list[Coordinator], tmp_path: Path
) -> None:
    v1 = tmp_path / "federation-v1.json"
    created = write_v1(clouds[0], clouds, v1, "--rule", "median")
    assert created["notes"] == []
    assert created["signers"] == [c.cloud for c in clouds]
    assert created["needed"] == 4
    assert created["signatures"]["count"] == 0

    for count, member in enumerate(clouds, start=1):
        signed = member.run_json("sign", v1)
        assert signed["signatures"]["count"] == count
        assert signed["signatures"]["needed"] == 4
        assert signed["complete"] == (count == 4)

    verified = clouds[2].run_json("verify", v1)
    assert verified["valid"] is True
    assert verified["problems"] == []
    text = clouds[2].run("verify", v1)
    assert text.exit_code == 0
    assert "4 clouds: quorum 3, tolerates 1 faulty" in text.output

    for member in clouds:
        # `init` installed a one-cloud federation; joining this one replaces it.
        result = member.run("install", v1, "--replace")
        assert result.exit_code == 0, result.output
        assert (member.state_dir / MANIFEST_NAME).read_bytes() == v1.read_bytes()
        again = member.run_json("install", v1)
        assert again["already_installed"] is True

    shown = clouds[3].run_json("show")
    digest = manifest_digest(decode_manifest_file(v1.read_bytes()).manifest)
    assert shown["deployment"] == "plant-a"
    assert shown["version"] == 1
    assert shown["digest"] == digest == created["digest"]
    assert [c["cloud"] for c in shown["clouds"]] == [c.cloud for c in clouds]
    assert [c["public_key"] for c in shown["clouds"]] == [c.public_key for c in clouds]
    assert shown["clouds"][1]["broker"] == "mqtt.cloud-2.example:8883"
    assert len(shown["clouds"][0]["fingerprint"]) == 19
    assert shown["quorum"] == 3
    assert shown["faults_tolerated"] == 1
    assert shown["tolerance"] == "4 clouds: quorum 3, tolerates 1 faulty (Byzantine or crashed)"
    assert shown["rule"] == "median"
    assert shown["consensus"]["timeout_propose_s"] == 10.0
    assert shown["signatures"]["count"] == 4
    assert shown["signatures"]["needed"] == 4
    assert shown["signatures"]["missing"] == []
    assert shown["installed"] is True
    expected_genesis = genesis_record(DEFAULT_MODEL, shown["genesis_seed"]).digest
    assert shown["genesis_digest"] == expected_genesis

    table = clouds[3].run("show")
    assert table.exit_code == 0
    assert "tolerates 1 faulty" in table.output
    assert "rule:       median" in table.output
    assert "signatures: 4 of 4" in table.output


def test_init_adds_its_own_cloud_and_says_so(clouds: list[Coordinator], tmp_path: Path) -> None:
    out = tmp_path / "v1.json"
    result = clouds[0].run(
        "init", *[p for c in clouds[1:] for p in ("--cloud", c.cloud_option())], "--out", out
    )
    assert result.exit_code == 0, result.output
    assert "added this coordinator's cloud cloud-1" in result.stderr
    assert "loopback" in result.stderr  # init's default broker is 127.0.0.1
    manifest = decode_manifest_file(out.read_bytes()).manifest
    assert manifest.cloud_ids() == ("cloud-2", "cloud-3", "cloud-4", "cloud-1")
    assert manifest.entry("cloud-1") is not None
    assert manifest.clouds[-1].public_key == clouds[0].public_key
    again = clouds[0].run("init", "--cloud", clouds[1].cloud_option(), "--out", out)
    assert again.exit_code == ExitCode.USAGE  # never overwrites
    assert "exists" in again.output


def test_verify_of_version_1_with_three_signatures_exits_manifest(
    clouds: list[Coordinator], tmp_path: Path
) -> None:
    v1 = tmp_path / "v1.json"
    write_v1(clouds[0], clouds, v1)
    sign_all(clouds[:3], v1)
    result = clouds[0].run("verify", v1)
    assert result.exit_code == ExitCode.MANIFEST
    assert "3 of 4 signatures" in result.output
    assert "missing: cloud-4" in result.output
    as_json = clouds[0].run("verify", v1, "--json")
    assert as_json.exit_code == ExitCode.MANIFEST
    data = json.loads(as_json.stdout)
    assert data["valid"] is False
    assert data["signatures"]["missing"] == ["cloud-4"]
    assert any("missing: cloud-4" in p for p in data["problems"])
    refused = clouds[0].run("install", v1, "--replace")
    assert refused.exit_code == ExitCode.MANIFEST
    assert "missing: cloud-4" in refused.output


def test_install_of_a_manifest_without_this_cloud_is_refused(
    clouds: list[Coordinator], tmp_path: Path
) -> None:
    v1 = tmp_path / "v1.json"
    write_v1(clouds[1], clouds[1:], v1)
    sign_all(clouds[1:], v1)
    assert clouds[1].run("verify", v1).exit_code == 0
    result = clouds[0].run("install", v1, "--replace")
    assert result.exit_code == ExitCode.MANIFEST
    assert "does not list this coordinator's cloud cloud-1" in result.output
    refused = clouds[0].run("sign", v1)
    assert refused.exit_code == ExitCode.MANIFEST
    assert "cloud-1 is not listed" in refused.output


def test_version_2_rotates_a_key_with_a_quorum_of_version_1(
    clouds: list[Coordinator], tmp_path: Path
) -> None:
    v1, v2 = tmp_path / "v1.json", tmp_path / "v2.json"
    write_v1(clouds[0], clouds, v1)
    sign_all(clouds, v1)
    for member in clouds:
        assert member.run("install", v1, "--replace").exit_code == 0

    new_key = public_key_text(SigningKey.generate().verify_key)
    rotated = f"cloud-4={new_key}@mqtt.cloud-4.example:8883"
    created = clouds[1].run_json("init", "--next", v1, "--cloud", rotated, "--out", v2)
    assert created["version"] == 2
    assert created["needed"] == 3
    assert created["previous_digest"] == manifest_digest(
        decode_manifest_file(v1.read_bytes()).manifest
    )

    sign_all(clouds[:2], v2)
    short = clouds[2].run("verify", v2)
    assert short.exit_code == ExitCode.MANIFEST
    assert "2 of 3 signatures" in short.output
    assert clouds[2].run("install", v2).exit_code == ExitCode.MANIFEST

    # cloud-4 approves its own rotation with the key version 1 lists for it.
    sign_all(clouds[3:], v2)
    assert clouds[2].run_json("verify", v2)["signatures"]["count"] == 3
    on_a_fresh_machine = clouds[2].run_json("verify", v2, "--previous", v1)
    assert on_a_fresh_machine["valid"] is True

    for member in clouds[:3]:
        result = member.run("install", v2)
        assert result.exit_code == 0, result.output
    assert clouds[0].run_json("show")["version"] == 2
    assert clouds[0].run("install", v1).exit_code == ExitCode.MANIFEST  # older
    old_key = clouds[3].run("install", v2)
    assert old_key.exit_code == ExitCode.MANIFEST
    assert "replace the key file first" in old_key.output


def test_switching_federation_needs_replace(clouds: list[Coordinator], tmp_path: Path) -> None:
    v1 = tmp_path / "v1.json"
    write_v1(clouds[0], clouds, v1)
    sign_all(clouds, v1)
    result = clouds[0].run("install", v1)  # `init` installed this cloud's own federation
    assert result.exit_code == ExitCode.MANIFEST
    assert "--replace" in result.output
    assert clouds[0].run("install", v1, "--replace").exit_code == 0


def test_sign_refuses_a_manifest_whose_genesis_does_not_match(
    clouds: list[Coordinator], tmp_path: Path
) -> None:
    v1 = tmp_path / "v1.json"
    write_v1(clouds[0], clouds, v1)
    data = json.loads(v1.read_text())
    data["manifest"]["genesis_digest"] = "00" * 32
    v1.write_text(json.dumps(data))
    result = clouds[1].run("sign", v1)
    assert result.exit_code == ExitCode.MANIFEST
    assert "genesis_digest" in result.output
    assert json.loads(v1.read_text())["signatures"] == []


def test_sign_refuses_another_deployment(clouds: list[Coordinator], tmp_path: Path) -> None:
    other = make_coordinator(tmp_path / "other", "cloud-9", deployment="plant-b")
    v1 = tmp_path / "v1.json"
    write_v1(other, [other], v1)
    result = clouds[0].run("sign", v1)
    assert result.exit_code == ExitCode.MANIFEST
    assert "deployment 'plant-b'" in result.output


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--cloud", "cloud-2"], ExitCode.USAGE, "ID=ed25519:KEY@HOST:PORT"),
        (["--cloud", "cloud/2=ed25519:00@h:1"], ExitCode.USAGE, "invalid cloud id"),
        (["--cloud", "cloud-2=ed25519:zz@h:1"], ExitCode.USAGE, "not hex"),
        (["--remove-cloud", "cloud-2"], ExitCode.USAGE, "--remove-cloud needs --next"),
        (["--rule", "trimmed_mean"], ExitCode.MANIFEST, "needs at least 4 clouds"),
    ],
)
def test_init_errors(
    clouds: list[Coordinator], tmp_path: Path, args: list[str], code: int, message: str
) -> None:
    result = clouds[0].run("init", "--out", tmp_path / "x.json", *args)
    assert result.exit_code == code, result.output
    assert message in result.output
    assert not (tmp_path / "x.json").exists()


def test_init_with_another_key_for_this_cloud_is_a_key_error(
    clouds: list[Coordinator], tmp_path: Path
) -> None:
    wrong = f"cloud-1={clouds[1].public_key}@h.example:1883"
    result = clouds[0].run("init", "--cloud", wrong, "--out", tmp_path / "x.json")
    assert result.exit_code == ExitCode.CONFIG
    assert "this coordinator's key" in result.output


def test_init_out_under_a_file_is_a_config_error_not_a_traceback(
    clouds: list[Coordinator], tmp_path: Path
) -> None:
    (tmp_path / "afile").write_text("")
    result = clouds[0].run("init", "--out", tmp_path / "afile" / "x.json", "--json")
    assert result.exit_code == ExitCode.CONFIG, result.output
    assert json.loads(result.stdout) == {
        "error": f"cannot write {tmp_path / 'afile' / 'x.json'}: Not a directory",
        "exit_code": int(ExitCode.CONFIG),
    }


def test_without_a_state_dir_exit_config(tmp_path: Path) -> None:
    nobody = Coordinator("cloud-1", tmp_path / "none", "")
    result = nobody.run("init", "--out", tmp_path / "x.json")
    assert result.exit_code == ExitCode.CONFIG
    assert "fedgate-coordinator init" in result.output
    assert nobody.run("show").exit_code == ExitCode.CONFIG


def test_unreadable_manifest_file_exits_manifest(clouds: list[Coordinator], tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.json"
    garbage.write_text('{"manifest": 1}')
    for command in ("show", "verify", "sign", "install"):
        result = clouds[0].run(command, garbage)
        assert result.exit_code == ExitCode.MANIFEST, (command, result.output)
        assert "not a valid manifest file" in result.output


def test_help_has_examples_and_the_manifest_exit_code() -> None:
    runner = CliRunner()
    for command in ([], ["init"], ["sign"], ["show"], ["verify"], ["install"]):
        result = runner.invoke(main, ["federation", *command, "--help"])
        assert result.exit_code == 0, result.output
        assert "Example" in result.output
        assert "8 the federation manifest is invalid" in result.output
    assert "8 the federation manifest is invalid" in runner.invoke(main, ["--help"]).output
    assert "8 the federation manifest" in runner.invoke(main, ["federation", "--help"]).output
    assert "8 the federation manifest is invalid" in EXIT_CODES_HELP
    assert int(ExitCode.MANIFEST) == 8


def test_a_cloud_added_in_version_2_joins_with_the_chain(
    clouds: list[Coordinator], tmp_path: Path
) -> None:
    v1, v2 = tmp_path / "v1.json", tmp_path / "v2.json"
    write_v1(clouds[0], clouds, v1)
    sign_all(clouds, v1)
    for member in clouds:
        assert member.run("install", v1, "--replace").exit_code == 0
    newcomer = make_coordinator(tmp_path, "cloud-5")
    created = clouds[0].run_json(
        "init", "--next", v1, "--cloud", newcomer.cloud_option(), "--out", v2
    )
    assert created["tolerance"] == "5 clouds: quorum 4, tolerates 1 faulty (Byzantine or crashed)"
    assert created["needed"] == 3  # a quorum of version 1's four clouds

    not_yet = newcomer.run("sign", v2, "--previous", v1)
    assert not_yet.exit_code == ExitCode.MANIFEST
    assert "would not count" in not_yet.output
    sign_all(clouds[1:], v2)

    assert newcomer.run("install", v2).exit_code == ExitCode.MANIFEST  # its own federation
    without_chain = newcomer.run("install", v2, "--replace")
    assert without_chain.exit_code == ExitCode.MANIFEST
    assert "predecessor" in without_chain.output
    joined = newcomer.run("install", v2, "--replace", "--previous", v1)
    assert joined.exit_code == 0, joined.output
    shown = newcomer.run_json("show")
    assert shown["version"] == 2
    assert shown["quorum"] == 4
    assert shown["clouds"][-1]["cloud"] == "cloud-5"
    assert shown["signatures"]["checked"] is False  # version 1 is not kept here
    assert newcomer.run_json("show", v2, "--previous", v1)["signatures"]["count"] == 3
    assert clouds[0].run_json("install", v2)["version"] == 2


def test_server_momentum_is_written_only_when_it_is_set(
    clouds: list[Coordinator], tmp_path: Path
) -> None:
    """Without --server-momentum (or with 0) the manifest has no such field, so releases
    that do not know it still read it; with it, the field is digested and signed, and
    --next keeps or replaces it."""
    for name, extra in (("plain", ()), ("zero", ("--server-momentum", "0"))):
        plain = tmp_path / f"{name}.json"
        write_v1(clouds[0], clouds[1:], plain, *extra)
        assert b"server_momentum" not in plain.read_bytes()
        assert decode_manifest_file(plain.read_bytes()).manifest.momentum == 0.0
    moving = tmp_path / "moving.json"
    write_v1(clouds[0], clouds[1:], moving, "--server-momentum", "0.8")
    manifest = decode_manifest_file(moving.read_bytes()).manifest
    assert manifest.momentum == 0.8
    sign_all(clouds, moving)
    kept = tmp_path / "kept.json"
    assert clouds[0].run("init", "--next", moving, "--out", kept).exit_code == 0
    assert decode_manifest_file(kept.read_bytes()).manifest.momentum == 0.8
    dropped = tmp_path / "dropped.json"
    result = clouds[0].run("init", "--next", moving, "--server-momentum", "0", "--out", dropped)
    assert result.exit_code == 0, result.output
    assert b"server_momentum" not in dropped.read_bytes()
