"""Real processes end to end: `fedgate-coordinator serve` and two `fedgate-agent run`,
configured with the CLIs exactly as an operator would, over the machine's Mosquitto, with
secure aggregation (the default); gw-1 trains with record-level DP and reports its ε. The
federation starts from a genesis pre-trained with `fedgate-agent pretrain` on public runs
(here synthetic ones in the plant-runs format), which the agents take as round 0."""

from __future__ import annotations

import asyncio
import json
import secrets
import signal
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import aiomqtt
import msgspec
import numpy as np
import pytest
import tomli_w
from fedgate_agent.training import LocalDataset, save_local_dataset
from fedgate_common.model_spec import ModelSpec
from fedgate_common.plant_runs import PlantRun, RunsMeta, save_plant_runs
from fedgate_common.topics import model_topic

BIN = Path(sys.executable).parent
SPEC = ModelSpec(n_features=4, window=8, n_classes=2, channels=8)


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(BIN / args[0]), *args[1:]], capture_output=True, text=True, check=False, timeout=120
    )
    if check:
        assert result.returncode == 0, f"{args}: {result.stderr}"
    return result


def as_json(*args: str) -> Any:
    return json.loads(run(*args, "--json").stdout)


async def clear_retained_model(deployment: str) -> None:
    """Leave the shared broker as it was."""
    async with aiomqtt.Client("127.0.0.1", 1883) as client:
        await client.publish(model_topic(deployment, "c1"), b"", qos=1, retain=True)


def learnable_dataset(seed: int, n: int = 120) -> LocalDataset:
    """Class 1 windows have a raised first channel: learnable in a few epochs."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n).astype(np.int64)
    x = rng.normal(0, 1, (n, SPEC.window, SPEC.n_features)).astype(np.float32)
    x[:, :, 0] += 2.0 * y[:, None]
    return LocalDataset(x=x, y=y)


def public_runs_file(path: Path) -> Path:
    """Runs in the plant-runs format with the same signal as the sites' data: label 1
    raises the first channel (from the middle of each run)."""
    rng = np.random.default_rng(99)
    runs = []
    for fault in (0, 1):
        y = np.where(np.arange(200) < 100, 0, fault).astype(np.int64)
        x = rng.normal(0, 1, (200, SPEC.n_features))
        x[:, 0] += 2.0 * y
        runs.append(PlantRun(fault=fault, set=0, x=x, y=y))
    meta = RunsMeta(
        simulator="synthetic (test)",
        seed=99,
        sets=1,
        hours=10.0,
        fault_start_h=5.0,
        sample_minutes=3.0,
        control_seconds=9.0,
        created_at="2026-11-29T00:00:00Z",
    )
    save_plant_runs(path, runs, meta)
    return path


def config_set(config: Path, key: str, value: str) -> None:
    """`fedgate-agent config set`, as an operator edits the agent's configuration."""
    run("fedgate-agent", "config", "set", "--config", str(config), key, value)


def init_coordinator(coord: Path, deployment: str, spec_file: Path, *options: str) -> Any:
    """`fedgate-coordinator init --json` of cloud c1, for two agents."""
    return as_json(
        "fedgate-coordinator",
        "--state-dir",
        str(coord),
        "init",
        "--cloud",
        "c1",
        "--deployment",
        deployment,
        "--min-participants",
        "2",
        "--update-timeout",
        "90",
        "--model-spec",
        str(spec_file),
        *options,
    )


def init_agent(config: Path, name: str, deployment: str, state: Path, *options: str) -> Any:
    """`fedgate-agent init --json` for agent ``name`` of cloud c1."""
    return as_json(
        "fedgate-agent",
        "init",
        "--config",
        str(config),
        "--agent-id",
        name,
        "--deployment",
        deployment,
        "--cloud",
        "c1",
        "--state-dir",
        str(state),
        *options,
    )


def noisy_federation(
    tmp_path: Path,
    deployment: str,
    coordinator: dict[str, dict[str, Any]],
    agent: dict[str, str],
) -> list[Path]:
    """Coordinator c1 in ``tmp_path / "coordinator"`` with ``coordinator``'s sections merged
    into its coordinator.toml (32-bit words, short stages), and agents gw-1, gw-2 enrolled,
    pinned, configured with ``agent``'s keys and given learnable data; their configs."""
    coord = tmp_path / "coordinator"
    spec_file = tmp_path / "spec.json"
    spec_file.write_bytes(msgspec.json.encode(SPEC))
    init = init_coordinator(coord, deployment, spec_file)
    coordinator_toml = coord / "coordinator.toml"
    settings = tomllib.loads(coordinator_toml.read_text())
    settings.setdefault("secagg", {}).update(word_bits=32, stage_timeout_s=5.0)
    for section, values in coordinator.items():
        settings.setdefault(section, {}).update(values)
    coordinator_toml.write_text(tomli_w.dumps(settings))
    configs: list[Path] = []
    for index, name in enumerate(("gw-1", "gw-2")):
        config = tmp_path / name / "agent.toml"
        enrolled = init_agent(
            config,
            name,
            deployment,
            tmp_path / name / "state",
            "--coordinator-key",
            init["coordinator_public_key"],
        )
        run("fedgate-agent", "federation", "pin", "--config", str(config), init["manifest"])
        for key, value in agent.items():
            config_set(config, key, value)
        run(
            "fedgate-coordinator", "--state-dir", str(coord), "enroll", name, enrolled["public_key"]
        )
        save_local_dataset(
            tmp_path / name / "state" / "data" / "train.npz", learnable_dataset(index)
        )
        configs.append(config)
    return configs


def serve_rounds(
    coord: Path, configs: list[Path], deployment: str, logs_dir: Path, rounds: int = 2
) -> list[dict[str, Any]]:
    """`fedgate-agent run` for each config, `fedgate-coordinator serve --rounds ROUNDS` until
    it ends (exit 0), then each agent's `status --json` while it still runs; agents stopped."""
    logs = [(logs_dir / f"agent-{i}.log").open("wb") for i in range(len(configs))]
    agents = [
        subprocess.Popen(
            [str(BIN / "fedgate-agent"), "run", "--config", str(c)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        for c, log in zip(configs, logs, strict=True)
    ]
    try:
        served = subprocess.run(
            [
                str(BIN / "fedgate-coordinator"),
                *("--state-dir", str(coord), "serve", "--rounds", str(rounds)),
            ],
            capture_output=True,
            text=True,
            timeout=240,
            check=False,
        )
        assert served.returncode == 0, served.stderr[-3000:]
        return [as_json("fedgate-agent", "status", "--config", str(c)) for c in configs]
    finally:
        for process in agents:
            process.send_signal(signal.SIGTERM)
        for process in agents:
            process.wait(timeout=30)
        for log in logs:
            log.close()
        asyncio.run(clear_retained_model(deployment))


@pytest.mark.slow
def test_two_agents_complete_two_rounds(tmp_path: Path) -> None:
    deployment = f"e2e-{secrets.token_hex(4)}"
    coord = tmp_path / "coordinator"
    spec_file = tmp_path / "spec.json"
    spec_file.write_bytes(msgspec.json.encode(SPEC))
    genesis_file = tmp_path / "genesis.msgpack"
    pretrained = as_json(
        "fedgate-agent",
        "pretrain",
        str(public_runs_file(tmp_path / "runs.npz")),
        "--model-spec",
        str(spec_file),
        "--seed",
        "3",
        "--out",
        str(genesis_file),
    )
    init = init_coordinator(coord, deployment, spec_file, "--genesis-weights", str(genesis_file))
    assert init["genesis_model"] == pretrained["digest"]
    configs: list[Path] = []
    for index, name in enumerate(("gw-1", "gw-2")):
        config = tmp_path / name / "agent.toml"
        agent = init_agent(config, name, deployment, tmp_path / name / "state")
        # Not enrolled with the coordinator's key yet: `config validate` says what to fix.
        invalid = run("fedgate-agent", "config", "validate", "--config", str(config), check=False)
        assert invalid.returncode == 3
        assert "coordinator_public_key" in invalid.stderr
        config_set(config, "coordinator_public_key", init["coordinator_public_key"])
        # Still no federation manifest pinned: the agent would accept no model.
        unpinned = run("fedgate-agent", "config", "validate", "--config", str(config), check=False)
        assert unpinned.returncode == 3
        assert "federation pin" in unpinned.stderr
        run("fedgate-agent", "federation", "pin", "--config", str(config), init["manifest"])
        run("fedgate-agent", "config", "validate", "--config", str(config))
        if name == "gw-1":
            for key, value in (("privacy.record_level", "on"), ("privacy.target_epsilon", "8")):
                config_set(config, key, value)
        run("fedgate-coordinator", "--state-dir", str(coord), "enroll", name, agent["public_key"])
        save_local_dataset(
            tmp_path / name / "state" / "data" / "train.npz", learnable_dataset(index)
        )
        configs.append(config)

    statuses = serve_rounds(coord, configs, deployment, tmp_path)

    assert all(s["federation"]["pinned"] for s in statuses)
    assert statuses[0]["federation"]["clouds"] == ["c1"]
    rounds = as_json("fedgate-coordinator", "--state-dir", str(coord), "rounds")
    assert [(r["round"], r["status"], r["participants"]) for r in rounds] == [
        (2, "completed", 2),
        (1, "completed", 2),
    ]
    # Secure aggregation (the default): the coordinator never learns losses or sample
    # counts; each agent reports its own, and learning shows there.
    assert rounds[0]["aggregation"] == "secagg"
    assert rounds[0]["mean_train_loss"] is None
    detail = as_json("fedgate-coordinator", "--state-dir", str(coord), "rounds", "--detail", "2")
    assert [s["stage"] for s in detail["stages"]] == [
        "keys",
        "shares",
        "masked",
        "confirm",
        "reveal",
    ]
    assert all(s["received"] == 2 for s in detail["stages"])
    models = as_json("fedgate-coordinator", "--state-dir", str(coord), "models", "--verify")
    assert models["verified_length"] == 3
    assert models["models"][0]["digest"] == pretrained["digest"]  # round 0: pre-trained
    for status in statuses:
        assert status["running"] is True
        assert status["rounds_trained"] == 2
        assert status["last_answered_round"] == 2
        assert status["bytes_up"] > 0
        assert status["rejected"] == {}
    assert statuses[1]["last_train_loss"] < 0.69  # better than chance on a learnable task
    # gw-1's record-level ε, as its own ledger has it, is in the coordinator's ledger too.
    agent_privacy = as_json("fedgate-agent", "privacy", "--config", str(configs[0]))
    booked = as_json("fedgate-coordinator", "--state-dir", str(coord), "privacy")
    reports = booked["record_level"]["rows"]
    assert [(r["round"], r["agent"], r["unit"]) for r in reports] == [
        (1, "gw-1", "record"),
        (2, "gw-1", "record"),
    ]
    assert [r["epsilon_total"] for r in reports] == pytest.approx(
        [r["epsilon_total"] for r in agent_privacy["rounds"]]
    )
    assert 0 < reports[0]["epsilon_total"] < reports[1]["epsilon_total"] <= 8.0
    assert booked["record_level"]["agents"][0]["target_epsilon"] == 8.0
    final = [as_json("fedgate-agent", "status", "--config", str(c)) for c in configs]
    assert all(s["running"] is False for s in final)
    assert {s["model_digest"] for s in final} == {models["models"][-1]["digest"]}


@pytest.mark.slow
def test_agents_stop_at_their_own_site_level_budget(tmp_path: Path) -> None:
    """The coordinator runs site-level DP with a budget of ε 8 over three rounds; the
    agents' own `privacy.site_max_epsilon` of 5 holds one such round (ε 3.90 by their PLD
    count, two would be 5.84). Round 1 completes and both agents book it before their
    masked inputs leave; round 2 they refuse before sending keys, so it aborts and the
    coordinator books nothing more."""
    deployment = f"site-{secrets.token_hex(4)}"
    coord = tmp_path / "coordinator"
    configs = noisy_federation(
        tmp_path,
        deployment,
        {"privacy": {"site_level": "on", "target_epsilon": 8.0, "planned_rounds": 3}},
        {"privacy.site_max_epsilon": "5"},
    )

    statuses = serve_rounds(coord, configs, deployment, tmp_path)

    rounds = as_json("fedgate-coordinator", "--state-dir", str(coord), "rounds")
    assert [(r["round"], r["status"]) for r in rounds][-1] == (1, "completed")
    assert all(r["status"] != "completed" for r in rounds[:-1])
    booked = as_json("fedgate-coordinator", "--state-dir", str(coord), "privacy")
    assert [r["round"] for r in booked["rows"]] == [1]
    coordinator_epsilon = booked["rows"][0]["epsilon_total"]
    for config, status in zip(configs, statuses, strict=True):
        assert status["rejected"] == {"site_privacy_budget_exhausted": 1}, status
        assert status["site_privacy"] == "budget exhausted"
        site = as_json("fedgate-agent", "privacy", "--config", str(config))["site_level"]
        assert [r["round"] for r in site["rounds"]] == [1]
        assert 3.0 < site["spent_epsilon"] <= coordinator_epsilon <= 5.0


@pytest.mark.slow
def test_pooled_record_level_noise_over_two_rounds(tmp_path: Path) -> None:
    """Record-level DP with the noise pooled in the secure sum (privacy.md 3.7), as an
    operator configures it: the coordinator sizes each round's shares for ε 3 over two
    rounds at sampling rate 0.3; the agents take one clipped step a round, add only their
    share, and count the round at record level from the round's noise, with the ε left if
    the other agent colluded beside it."""
    deployment = f"pooled-{secrets.token_hex(4)}"
    coord = tmp_path / "coordinator"
    configs = noisy_federation(
        tmp_path,
        deployment,
        {
            "privacy": {
                "record_level": "pooled",
                "record_epsilon": 3.0,
                "record_clip_norm": 1.0,
                "record_sample_rate": 0.3,
                "planned_rounds": 2,
            },
            "rounds": {"local_epochs": 1, "batch_size": 32, "learning_rate": 0.5},
            # Both rounds must complete: room for a busy host's first round (imports).
            "secagg": {"stage_timeout_s": 20.0},
        },
        {
            "privacy.record_level": "on",
            "privacy.record_noise": "pooled",
            "privacy.target_epsilon": "3",
            "privacy.planned_rounds": "2",
            "privacy.max_grad_norm": "1.0",
        },
    )

    # Three rounds asked for; the budget holds two, so serve stops after them.
    statuses = serve_rounds(coord, configs, deployment, tmp_path, rounds=3)

    rounds = as_json("fedgate-coordinator", "--state-dir", str(coord), "rounds")
    assert sorted((r["round"], r["status"]) for r in rounds) == [(1, "completed"), (2, "completed")]
    coordinator = as_json("fedgate-coordinator", "--state-dir", str(coord), "privacy")
    sigma = coordinator["settings"]["record_noise_multiplier"]
    assert coordinator["settings"]["record_level"] == "pooled"
    # The shares carry no site-level guarantee worth booking: the rounds stay unrecorded.
    assert coordinator["rows"] == []
    assert coordinator["unrecorded_rounds"] == 2
    # The coordinator's own count: both rounds, at least the σ it sized, within ε 3.
    pooled = coordinator["record_level"]["pooled"]
    assert [r["round"] for r in pooled["rows"]] == [1, 2]
    assert all(r["effective_noise_multiplier"] >= sigma for r in pooled["rows"])
    assert 2.5 < pooled["epsilon_spent"] <= 3.0
    assert pooled["budget_left"] == pytest.approx(3.0 - pooled["epsilon_spent"])
    events = as_json("fedgate-coordinator", "--state-dir", str(coord), "events")
    stops = [e for e in events if e["kind"] == "privacy_budget_spent"]
    assert [(e["round"], e["detail"].split(":")[0]) for e in stops] == [
        (3, "record-level (noise pooled) privacy budget")
    ]
    assert {a["agent"] for a in coordinator["record_level"]["agents"]} == {"gw-1", "gw-2"}
    for config, status in zip(configs, statuses, strict=True):
        assert status["rejected"] == {}, status
        ledger = as_json("fedgate-agent", "privacy", "--config", str(config))
        assert ledger["record_noise"] == "pooled"
        rows = ledger["rounds"]
        assert [(r["round"], r["steps"]) for r in rows] == [(1, 1), (2, 1)]
        for row in rows:
            # The sum's noise is at least what the coordinator sized it for (to 0.1 %);
            # the agent's own share alone is 1/√2 of it (two inputs, none withheld).
            assert sigma * 0.999 <= row["noise_multiplier"] <= sigma * 1.01
            assert row["own_share_noise_multiplier"] == pytest.approx(
                row["noise_multiplier"] / np.sqrt(2), rel=1e-3
            )
            assert 120 * 0.2 < 120 * row["sample_rate"] <= 32
        assert 2.5 < ledger["spent_epsilon"] <= 3.0
        assert ledger["spent_epsilon_own_share_only"] > ledger["spent_epsilon"] + 1
