"""A federation that starts from a pre-trained genesis model (manifest ``genesis_source``
``"weights"``): the weights file goes through `init`, `federation init/sign/install` and
the first `serve`'s genesis, and every command refuses a missing or different file."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import numpy as np
import pytest
from click.testing import CliRunner
from fedgate_common.genesis_weights import (
    GenesisWeights,
    encode_genesis_weights,
    genesis_weights_digest,
    make_genesis_weights,
    write_genesis_weights,
)
from fedgate_common.model_spec import DEFAULT_MODEL, ModelSpec, initial_weights
from fedgate_coordinator.cli import ExitCode, main
from fedgate_coordinator.config import load_config
from fedgate_coordinator.errors import ConfigError
from fedgate_coordinator.genesis import GENESIS_WEIGHTS_NAME, genesis_record
from fedgate_coordinator.store import Store

from tests.common.test_genesis_weights import PRETRAINING
from tests.coordinator.test_cli_federation import Coordinator, make_coordinator, write_v1
from tests.federation_support import add_genesis


def pretrained(seed: int, spec: ModelSpec = DEFAULT_MODEL) -> GenesisWeights:
    """Weights that differ from the seed's random ones, as pre-training makes them."""
    start = initial_weights(spec, np.random.default_rng(seed))
    trained = {name: array + np.float32(0.01) for name, array in start.items()}
    return make_genesis_weights(
        spec, trained, msgspec.structs.replace(PRETRAINING, start_seed=seed)
    )


@pytest.fixture
def weights_file(tmp_path: Path) -> Path:
    path = tmp_path / "genesis.msgpack"
    write_genesis_weights(path, pretrained(5))
    return path


def _head_digest(state_dir: Path) -> str:
    config = load_config(state_dir)
    add_genesis(state_dir, config.database_url)
    with Store.open(config.database_url) as store:
        head = store.head_model()
    assert head is not None
    assert head.round == 0
    return head.digest


def _init(state_dir: Path, *extra: str | Path) -> tuple[int, str]:
    result = CliRunner().invoke(
        main,
        ["--state-dir", str(state_dir), "init", "--cloud", "cloud-1", *map(str, extra)],
    )
    return result.exit_code, result.output


def test_init_with_genesis_weights_starts_the_chain_from_them(
    tmp_path: Path, weights_file: Path
) -> None:
    state_dir = tmp_path / "coord"
    code, output = _init(state_dir, "--genesis-weights", weights_file, "--json")
    assert code == 0, output
    data = json.loads(output)
    digest = genesis_weights_digest(pretrained(5))
    assert data["genesis_source"] == "weights"
    assert data["genesis_model"] == digest
    assert digest != genesis_record(DEFAULT_MODEL, 5).digest
    assert (state_dir / GENESIS_WEIGHTS_NAME).read_bytes() == weights_file.read_bytes()
    assert _head_digest(state_dir) == digest


def test_serve_without_the_weights_file_says_how_to_install_it(
    tmp_path: Path, weights_file: Path
) -> None:
    state_dir = tmp_path / "coord"
    assert _init(state_dir, "--genesis-weights", weights_file)[0] == 0
    (state_dir / GENESIS_WEIGHTS_NAME).unlink()
    with pytest.raises(ConfigError) as caught:
        _head_digest(state_dir)
    assert "give their file with --genesis-weights" in str(caught.value)
    assert any("federation install" in problem for problem in caught.value.problems)
    # A file that is not the manifest's genesis is refused the same way.
    write_genesis_weights(state_dir / GENESIS_WEIGHTS_NAME, pretrained(6))
    with pytest.raises(ConfigError, match="trained from seed 6"):
        _head_digest(state_dir)


def test_init_refuses_a_seed_with_weights_and_another_spec(
    tmp_path: Path, weights_file: Path
) -> None:
    code, output = _init(tmp_path / "a", "--genesis-weights", weights_file, "--genesis-seed", "3")
    assert code == ExitCode.USAGE
    assert "exclude each other" in output
    other_spec = tmp_path / "spec.json"
    other_spec.write_text('{"n_features": 52, "window": 20, "n_classes": 22, "channels": 8}')
    code, output = _init(
        tmp_path / "b", "--genesis-weights", weights_file, "--model-spec", other_spec
    )
    assert code == ExitCode.CONFIG
    assert "another model spec" in output
    garbage = tmp_path / "garbage.msgpack"
    garbage.write_bytes(b"not weights")
    code, output = _init(tmp_path / "c", "--genesis-weights", garbage)
    assert code == ExitCode.CONFIG
    assert "garbage.msgpack: not a genesis-weights file" in output
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("start_seed", [-1, 2**63, 2**64 - 1])
def test_init_refuses_weights_whose_start_seed_no_manifest_can_hold(
    tmp_path: Path, start_seed: int
) -> None:
    """Such a file once gave a manifest that `serve` and `federation verify` refuse."""
    raw = msgspec.msgpack.decode(encode_genesis_weights(pretrained(5)))
    raw["pretraining"]["start_seed"] = start_seed
    weights_file = tmp_path / "genesis.msgpack"
    weights_file.write_bytes(msgspec.msgpack.encode(raw))
    code, output = _init(tmp_path / "coord", "--genesis-weights", weights_file)
    assert code == ExitCode.CONFIG, output
    assert f"start_seed {start_seed} is not a genesis seed (0..2**63-1)" in output
    assert not (tmp_path / "coord").exists()


def test_four_clouds_sign_and_install_a_pre_trained_genesis(
    tmp_path: Path, weights_file: Path
) -> None:
    clouds: list[Coordinator] = [make_coordinator(tmp_path, f"cloud-{i}") for i in range(1, 5)]
    v1 = tmp_path / "federation-v1.json"
    created = write_v1(clouds[0], clouds, v1, "--genesis-weights", str(weights_file))
    digest = genesis_weights_digest(pretrained(5))
    assert created["genesis_source"] == "weights"
    assert created["genesis_digest"] == digest
    assert created["genesis_seed"] == 5

    # Signing needs the weights: without them, or with another file, it is refused.
    result = clouds[1].run("sign", v1)
    assert result.exit_code == ExitCode.MANIFEST
    assert "give their file with --genesis-weights" in result.output
    other = tmp_path / "other.msgpack"
    same_seed_other_weights = GenesisWeights(
        spec=DEFAULT_MODEL, weights=pretrained(6).weights, pretraining=pretrained(5).pretraining
    )
    write_genesis_weights(other, same_seed_other_weights)
    result = clouds[1].run("sign", v1, "--genesis-weights", other)
    assert result.exit_code == ExitCode.MANIFEST
    assert "another file" in result.output
    for member in clouds:
        signed = member.run("sign", v1, "--genesis-weights", weights_file)
        assert signed.exit_code == 0, signed.output

    result = clouds[3].run("install", v1, "--replace")
    assert result.exit_code == ExitCode.MANIFEST
    assert "give their file with --genesis-weights" in result.output
    for member in clouds:
        installed = member.run("install", v1, "--replace", "--genesis-weights", weights_file)
        assert installed.exit_code == 0, installed.output
        assert (member.state_dir / GENESIS_WEIGHTS_NAME).read_bytes() == weights_file.read_bytes()

    # Installing the same manifest again checks a weights file it is given, too.
    again = clouds[0].run("install", v1, "--genesis-weights", other)
    assert again.exit_code == ExitCode.MANIFEST, again.output
    assert "another file" in again.output
    kept = clouds[0].state_dir / GENESIS_WEIGHTS_NAME
    assert kept.read_bytes() == weights_file.read_bytes()
    assert clouds[0].run("install", v1, "--genesis-weights", weights_file).exit_code == 0

    shown = clouds[2].run_json("show")
    assert shown["genesis_source"] == "weights"
    assert "pre-trained weights, trained from seed 5" in clouds[2].run("show").output
    assert {_head_digest(member.state_dir) for member in clouds} == {digest}


def test_a_seeded_manifest_takes_no_weights_file(tmp_path: Path, weights_file: Path) -> None:
    clouds = [make_coordinator(tmp_path, f"cloud-{i}") for i in range(1, 3)]
    v1 = tmp_path / "federation-v1.json"
    write_v1(clouds[0], clouds, v1)
    result = clouds[0].run("sign", v1, "--genesis-weights", weights_file)
    assert result.exit_code == ExitCode.USAGE
    assert "derived from its seed" in result.output
    result = clouds[0].run("init", "--genesis-weights", weights_file, "--genesis-seed", "1")
    assert result.exit_code == ExitCode.USAGE
