"""`make demo`: one coordinator, six agents on non-IID Tennessee Eastman splits, 20 rounds.

Updates travel masked (SecAgg+) and every agent trains with record-level DP (DP-SGD, ε = 3
at δ = 1e-5 per site over the run) by default; the ε each site has spent is printed after
every round. ``--dp site`` adds site-level distributed noise instead (coordinator.toml
``[privacy] site_level = "on"``), ``--dp off`` trains without DP, and ``--aggregation
plaintext`` runs the baseline with the same seeds (``--seed``), so final accuracies compare.

Everything runs as real processes over a real MQTT broker; the coordinator keeps its
store in ``out/demo/coordinator/coordinator.db`` for ``fedgate-coordinator status`` to read.
At the end the same model is trained centrally on the union of the sites' data, and both
accuracies are printed and written to ``out/demo/summary.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import aiomqtt
import msgspec
import numpy as np
import tomli_w
import torch
from demo_broker import demo_broker  # this script's directory is on sys.path
from fedgate_agent.datasets.tep import centralized_dataset, federated_split, write_site_files
from fedgate_agent.model import build_model
from fedgate_agent.privacy_ledger import read_ledger
from fedgate_agent.training import LocalDataset, evaluate, train_locally
from fedgate_common.model_spec import initial_weights
from fedgate_common.text_table import format_table
from fedgate_common.topics import model_topic
from fedgate_coordinator.rounds import RoundSettings
from fedgate_coordinator.store import Store

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ROUND_DEFAULTS = RoundSettings()  # the coordinator's defaults; the baseline uses the same
# The training plan under record-level DP: large Poisson batches, few steps, a small clip
# and a large learning rate (bench/privacy/README.md has the tuning behind it).
DP_ROUNDS = RoundSettings(
    learning_rate=1.0, lr_decay=0.9, momentum=0.9, local_epochs=2, batch_size=256
)
DP_CLIP = 1.0  # privacy.max_grad_norm


def run_cli(*args: str) -> dict[str, Any]:
    result = subprocess.run(
        [str(BIN / args[0]), *args[1:], "--json"], check=False, capture_output=True, text=True
    )
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(args[:3])} failed ({result.returncode}): {result.stderr}")
    data: dict[str, Any] = json.loads(result.stdout)
    return data


async def clear_retained(host: str, port: int, topic: str) -> None:
    async with aiomqtt.Client(host, port) as client:
        await client.publish(topic, b"", qos=1, retain=True)


def accuracy_of(store: Store, digest: str, test: LocalDataset) -> float:
    record = store.get_model(digest)
    assert record is not None
    model = build_model(record.decode_spec(), weights=record.decode_weights())
    return evaluate(model, test).accuracy


def record_epsilon(configs: list[Path]) -> float:
    """The largest record-level ε any site has spent so far (each site's privacy.json)."""
    spent = [read_ledger(config.parent).epsilon_total for config in configs]
    return round(max(spent, default=0.0), 4)


def wait_until_connected(
    configs: list[Path], processes: list[subprocess.Popen[bytes]], timeout: float = 300.0
) -> None:
    """Wait until every agent has connected to the broker (its status.json says so), so
    that the first round does not start while agents are still loading torch."""
    deadline = time.monotonic() + timeout
    waiting = list(configs)
    while waiting:
        waiting = [
            c
            for c in waiting
            if not (c.parent / "status.json").exists()
            or json.loads((c.parent / "status.json").read_text()).get("state") == "connecting"
        ]
        if any(p.poll() is not None for p in processes):
            raise SystemExit("an agent exited at start; see out/demo*/logs")
        if waiting and time.monotonic() > deadline:
            raise SystemExit(f"agents not connected after {timeout:.0f} s: {waiting}")
        time.sleep(0.5)


def site_epsilon(store: Store) -> float | None:
    """The federation's site-level ε so far (the coordinator's privacy_ledger)."""
    ledger = store.privacy_ledger(unit="site")
    return round(ledger[-1].epsilon_total, 4) if ledger else None


def configure_coordinator(state_dir: Path, changes: dict[str, dict[str, Any]]) -> None:
    """Edit coordinator.toml as an operator would: set keys in its sections."""
    path = state_dir / "coordinator.toml"
    config = tomllib.loads(path.read_text())
    for section, values in changes.items():
        config.setdefault(section, {}).update(values)
    path.write_text(tomli_w.dumps(config))


def centralized(
    train: LocalDataset, test: LocalDataset, spec: Any, plan: RoundSettings, rounds: int, seed: int
) -> float:
    """The same model and optimiser, trained on the union for as many epochs as one site
    trains in the whole federation (rounds × local epochs), with the same lr decay."""
    # The same initial weights as the federation's genesis model (init --genesis-seed).
    model = build_model(spec, weights=initial_weights(spec, np.random.default_rng(seed)))
    for number in range(1, rounds + 1):
        train_locally(model, train, plan.plan_for(number), seed=number)
    return evaluate(model, test).accuracy


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sites", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--out", type=Path, default=None, help="default: out/demo[-plaintext]")
    parser.add_argument(
        "--aggregation",
        choices=("secagg", "plaintext"),
        default="secagg",
        help="secagg (default): masked updates, SecAgg+; plaintext: the baseline",
    )
    parser.add_argument(
        "--dp",
        choices=("record", "site", "off"),
        default="record",
        help="record (default): DP-SGD on every agent, record-level ε budget --epsilon over "
        "the run; site: distributed noise in the masked sum, site-level budget "
        "--site-epsilon; off: no DP",
    )
    parser.add_argument("--epsilon", type=float, default=3.0, help="record-level ε budget")
    parser.add_argument("--site-epsilon", type=float, default=8.0, help="site-level ε budget")
    parser.add_argument(
        "--seed",
        type=int,
        default=1,
        help="fixes the initial model and each site's training order, so runs compare",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.dp == "site" and args.aggregation != "secagg":
        parser.error("--dp site needs --aggregation secagg: the agents add the noise")
    suffix = ("" if args.aggregation == "secagg" else "-plaintext") + {
        "record": "",
        "site": "-site-dp",
        "off": "-no-dp",
    }[args.dp]
    plan = DP_ROUNDS if args.dp == "record" else ROUND_DEFAULTS
    out: Path = args.out or ROOT / "out" / f"demo{suffix}"
    shutil.rmtree(out, ignore_errors=True)
    (out / "logs").mkdir(parents=True)
    deployment = f"demo-{int(time.time())}"

    print(f"[1/5] splitting Tennessee Eastman data over {args.sites} sites (non-IID)", flush=True)
    split = federated_split(args.sites)
    for index, site in enumerate(split.sites):
        faults = sorted(split.site_faults[index])
        print(f"      site-{index + 1}: {len(site)} windows, faults {faults}")
    print(f"      test set: {len(split.test)} windows, 22 classes")

    processes: list[subprocess.Popen[bytes]] = []
    with demo_broker() as broker:
        print(f"[2/5] broker: {broker.kind} at {broker.host}:{broker.port}", flush=True)
        coord_dir = out / "coordinator"
        spec_file = out / "model-spec.json"
        spec_file.write_bytes(msgspec.json.encode(split.spec))
        init = run_cli(
            "fedgate-coordinator",
            "--state-dir",
            str(coord_dir),
            "init",
            "--cloud",
            "cloud-1",
            "--deployment",
            deployment,
            "--broker-host",
            broker.host,
            "--broker-port",
            str(broker.port),
            "--min-participants",
            str(max(2, args.sites - 2)),
            "--update-timeout",
            "120",
            "--model-spec",
            str(spec_file),
            "--aggregation",
            args.aggregation,
            "--genesis-seed",
            str(args.seed),
        )
        rounds_settings = {
            "learning_rate": plan.learning_rate,
            "lr_decay": plan.lr_decay,
            "momentum": plan.momentum,
            "local_epochs": plan.local_epochs,
            "batch_size": plan.batch_size,
        }
        changes: dict[str, dict[str, Any]] = {"rounds": rounds_settings}
        if args.dp == "site":
            changes["privacy"] = {
                "site_level": "on",
                "target_epsilon": args.site_epsilon,
                "planned_rounds": args.rounds,
            }
            changes["secagg"] = {"word_bits": 32}
        configure_coordinator(coord_dir, changes)
        agent_configs: list[Path] = []
        for index in range(args.sites):
            name = f"site-{index + 1}"
            state = out / "agents" / name
            config = state / "agent.toml"
            agent = run_cli(
                "fedgate-agent",
                "init",
                "--config",
                str(config),
                "--agent-id",
                name,
                "--deployment",
                deployment,
                "--cloud",
                "cloud-1",
                "--state-dir",
                str(state),
                "--broker-host",
                broker.host,
                "--broker-port",
                str(broker.port),
                "--coordinator-key",
                init["coordinator_public_key"],
            )
            settings = {"training.seed": str(args.seed * 1000 + index)}
            if args.aggregation == "plaintext":
                settings["secagg.plaintext_rounds"] = "allow"  # agents refuse it by default
            if args.dp == "record":
                settings["privacy.record_level"] = "on"
                settings["privacy.target_epsilon"] = str(args.epsilon)
                settings["privacy.planned_rounds"] = str(args.rounds)
                settings["privacy.max_grad_norm"] = str(DP_CLIP)
            for key, value in settings.items():
                subprocess.run(
                    [
                        str(BIN / "fedgate-agent"),
                        "config",
                        "set",
                        "--config",
                        str(config),
                        key,
                        value,
                    ],
                    check=True,
                    capture_output=True,
                )
            run_cli(
                "fedgate-coordinator",
                "--state-dir",
                str(coord_dir),
                "enroll",
                name,
                agent["public_key"],
            )
            agent_configs.append(config)
        write_site_files(split, [config.parent for config in agent_configs])

        print(
            f"[3/5] starting 1 coordinator and {args.sites} agents; {args.rounds} rounds",
            flush=True,
        )
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        for config in agent_configs:
            log = (out / "logs" / f"{config.parent.name}.log").open("wb")
            processes.append(
                subprocess.Popen(
                    [str(BIN / "fedgate-agent"), "run", "--config", str(config)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                )
            )
        wait_until_connected(agent_configs, processes)
        coord_log = (out / "logs" / "coordinator.log").open("wb")
        coordinator = subprocess.Popen(
            [
                str(BIN / "fedgate-coordinator"),
                "--state-dir",
                str(coord_dir),
                "serve",
                "--rounds",
                str(args.rounds),
            ],
            stdout=coord_log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        processes.append(coordinator)

        store = Store.open(init["database_url"], migrate=False)
        headers = [
            "round",
            "status",
            "participants",
            "train_loss",
            "test_acc",
            "bytes_up/agent",
            "bytes_down/agent",
            "record_eps",
            "site_eps",
        ]
        print(format_table(headers, []), flush=True)
        rows: list[list[Any]] = []
        seen: set[int] = set()
        started = time.monotonic()
        try:
            while True:
                finished = coordinator.poll() is not None
                for record in sorted(store.list_rounds(), key=lambda r: r.round):
                    if record.round in seen or record.status == "running":
                        continue
                    seen.add(record.round)
                    parts = store.participants(record.round)
                    up = int(np.mean([p.bytes_up for p in parts])) if parts else 0
                    acc = (
                        accuracy_of(store, record.model_digest, split.test)
                        if record.model_digest
                        else None
                    )
                    row = [
                        record.round,
                        record.status,
                        record.participants or 0,
                        record.mean_train_loss if record.mean_train_loss is not None else "-",
                        acc,
                        up,
                        record.bytes_down_per_agent or 0,
                        record_epsilon(agent_configs) if args.dp == "record" else "-",
                        site_epsilon(store) if args.dp == "site" else "-",
                    ]
                    rows.append(row)
                    print(format_table(headers, [row]).splitlines()[-1], flush=True)
                if finished:
                    break
                if time.monotonic() - started > 1800:
                    raise SystemExit("demo took longer than 30 minutes; see out/demo/logs")
                time.sleep(1.0)
        finally:
            for process in processes:
                if process.poll() is None:
                    process.send_signal(signal.SIGTERM)
            for process in processes:
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    process.kill()
        if coordinator.returncode != 0:
            raise SystemExit(
                f"coordinator exited with {coordinator.returncode}; "
                "see out/demo/logs/coordinator.log"
            )
        fed_seconds = time.monotonic() - started
        # Leave nothing behind on a shared broker: clear the retained latest model.
        asyncio.run(clear_retained(broker.host, broker.port, model_topic(deployment, "cloud-1")))

    completed = [row for row in rows if row[1] == "completed"]
    fedavg_accuracy = float(completed[-1][4]) if completed else 0.0
    print(
        f"[4/5] centralized training of the same model on the union "
        f"({len(centralized_dataset(split))} windows)",
        flush=True,
    )
    central_started = time.monotonic()
    central_accuracy = centralized(
        centralized_dataset(split), split.test, split.spec, plan, args.rounds, args.seed
    )
    central_seconds = time.monotonic() - central_started
    bytes_up = int(np.mean([row[5] for row in completed])) if completed else 0
    bytes_down = int(np.mean([row[6] for row in completed])) if completed else 0
    float32_model = (
        sum(int(np.prod(s)) for s in [p.shape for p in build_model(split.spec).parameters()]) * 4
    )
    summary = {
        "deployment": deployment,
        "aggregation": args.aggregation,
        "record_level_dp": args.dp == "record",
        "record_epsilon_budget": args.epsilon if args.dp == "record" else None,
        "record_epsilon_spent": record_epsilon(agent_configs) if args.dp == "record" else None,
        "site_level_dp": args.dp == "site",
        "site_epsilon_budget": args.site_epsilon if args.dp == "site" else None,
        "site_epsilon_spent": rows[-1][-1] if args.dp == "site" and rows else None,
        "training_plan": rounds_settings,
        "seed": args.seed,
        "sites": args.sites,
        "rounds_requested": args.rounds,
        "rounds_completed": len(completed),
        "rounds_aborted": sum(1 for row in rows if row[1] == "aborted"),
        "fedavg_accuracy": fedavg_accuracy,
        "centralized_accuracy": central_accuracy,
        "accuracy_gap_points": round(100 * (central_accuracy - fedavg_accuracy), 2),
        "bytes_up_per_agent_round": bytes_up,
        "bytes_down_per_agent_round": bytes_down,
        "float32_model_bytes": float32_model,
        "federated_seconds": round(fed_seconds, 1),
        "centralized_seconds": round(central_seconds, 1),
        "coordinator_state_dir": str(coord_dir),
        "rounds": [dict(zip(headers, row, strict=True)) for row in rows],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print("[5/5] result")
    label = "secure aggregation" if args.aggregation == "secagg" else "plaintext updates"
    if args.dp == "record":
        label += f", record-level DP (ε {record_epsilon(agent_configs)} of {args.epsilon})"
    elif args.dp == "site":
        label += f", site-level DP (ε {summary['site_epsilon_spent']} of {args.site_epsilon})"
    print(
        format_table(
            ["training", "test accuracy", "seconds"],
            [
                [
                    f"fedgate FedAvg, {label} ({args.sites} sites)",
                    fedavg_accuracy,
                    round(fed_seconds, 1),
                ],
                ["centralized (union of sites)", central_accuracy, round(central_seconds, 1)],
            ],
        )
    )
    print(
        f"gap: {summary['accuracy_gap_points']} points; bytes per agent per round: "
        f"up {bytes_up}, down {bytes_down} (float32 model: {float32_model})"
    )
    print(f"summary: {out / 'summary.json'}")
    print(f"inspect: .venv/bin/fedgate-coordinator --state-dir {coord_dir} status")
    return 0


if __name__ == "__main__":
    sys.exit(main())
