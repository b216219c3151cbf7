"""`make demo-live`: every site learns from a live simulated plant, through the bridge.

Per site, three processes run side by side, as they would on a plant floor:

- ``fedgate-bridge simulate``: a Tennessee Eastman plant (tep-studio) with its own seed and
  one fault that starts after a stretch of normal operation, served over Modbus TCP (even
  sites) or OPC-UA (odd sites) on a loopback port;
- ``fedgate-bridge run``: polls that server and publishes every tag as JSON with a per-topic
  sequence number to the site's cloud broker, buffering on disk while the broker is away;
- ``fedgate-agent run``: ingests ``plant/<site>/+/+`` (QoS 1, acknowledged after the
  group commit) into its durable buffer and, each round, trains on windows cut from the
  buffer as it is then (``training.source = "buffer"``), labelled by the plant's FAULT tag.

Clouds, coordinators, secure aggregation and consensus are those of ``make demo``
(``demo/run_demo.py``). Each site sees only normal operation and its own fault, so the
federation is non-IID. The global model is scored after every height on windows from
*other* runs of the same plant (other seeds, the same faults), simulated in this process
and never seen by any agent. After the last height the plants keep running until every
agent scores live windows with the last certified model (exported to ONNX, onnxruntime) and
its predictions reach the broker; a table shows that per site. At the end the demo prints
each site's ingest figures from ``fedgate-agent status --json`` and the bridges' from
``fedgate-bridge status --json``.

The plant runs --speed simulated seconds per wall second (default 1800: one 3-minute
sample every 0.1 s) with a 9 s control step (``--control-seconds``; 1.8 s is tep-studio's
own, slower and more faithful), so a few minutes cover days of plant time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import paho.mqtt.client as mqtt
import tomli_w
import torch
from demo_broker import cloud_brokers
from fedgate_agent.config import load_config, set_config_value
from fedgate_agent.datasets.tep import make_windows, tep_model_spec
from fedgate_agent.training import LocalDataset
from fedgate_bridge.simulator.register_map import FEATURE_TAGS
from fedgate_bridge.simulator.tep_plant import FaultSpec, TepPlant
from fedgate_common.consensus.quorum import tolerance_text
from fedgate_common.text_table import format_table
from fedgate_coordinator.rounds import RoundSettings
from fedgate_coordinator.store import Store
from paho.mqtt.enums import CallbackAPIVersion
from run_demo import (
    BIN,
    ROOT,
    SETUP_WORKERS,
    Cloud,
    Setup,
    Site,
    agents_seeded,
    demo_sites,
    follow_heights,
    pin_manifest,
    plan_section,
    plural,
    run_cli,
    set_up_federation,
    shown,
    start_coordinators,
    stop_all,
    wait_until_connected,
)

# One fault per site, from the classic set (IDV 6 trips the plant; 1-20 only: the model
# has classes 0-21). Faults whose effect is clear in a few hours come first.
SITE_FAULTS = (1, 2, 4, 5, 7, 8, 10, 11, 12, 13, 14, 17)
SAMPLE_MINUTES = 3.0
WINDOW = 20  # samples per window: the TEP model's
ROUNDS = RoundSettings(learning_rate=0.05, lr_decay=0.95, momentum=0.9, local_epochs=2)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def site_fault(index: int) -> int:
    return SITE_FAULTS[index % len(SITE_FAULTS)]


def evaluation_set(faults: list[int], args: argparse.Namespace) -> LocalDataset:
    """Windows from runs no agent sees: per fault (and normal), another seed of the plant,
    simulated here; the fault starts after args.onset_hours like on the sites."""
    pieces: list[LocalDataset] = []
    hours = args.onset_hours + args.eval_hours
    for offset, fault in enumerate([0, *faults]):
        plant = TepPlant(
            seed=10_000 + args.seed * 100 + offset,
            faults=[FaultSpec(idv=fault, start_h=args.onset_hours)] if fault else [],
            sample_minutes=SAMPLE_MINUTES,
            control_seconds=args.control_seconds,
        )
        samples = [plant.step() for _ in range(int(hours * 60 / SAMPLE_MINUTES))]
        x = np.array([[s.value(tag) for tag in FEATURE_TAGS] for s in samples], np.float32)
        y = np.array([s.fault for s in samples], np.int64)
        keep = slice(int(args.onset_hours * 60 / SAMPLE_MINUTES) if fault else 0, None)
        pieces.append(make_windows(x[keep], y[keep], WINDOW, 4))
    return LocalDataset(
        x=np.concatenate([p.x for p in pieces]), y=np.concatenate([p.y for p in pieces])
    )


def start_plant(site: Site, args: argparse.Namespace, out: Path) -> subprocess.Popen[bytes]:
    """`fedgate-bridge simulate` for the site; it writes the site's bridge.toml."""
    port = free_port()
    ports = ["--modbus-port", str(port)] if site.index % 2 == 0 else ["--opcua-port", str(port)]
    directory = site.config.parent
    command = [
        str(BIN / "fedgate-bridge"),
        "simulate",
        "--plant",
        "tep",
        "--seed",
        str(args.seed * 100 + site.index + 1),
        "--fault",
        f"IDV{site_fault(site.index)}:{args.onset_hours}",
        *ports,
        "--speed",
        str(args.speed),
        "--control-seconds",
        str(args.control_seconds),
        "--write-bridge-config",
        str(directory / "bridge.toml"),
        "--topic-prefix",
        f"plant/{site.name}",
        "--bridge-state-dir",
        str(directory / "bridge"),
        "--broker-host",
        site.cloud.broker.host,
        "--broker-port",
        str(site.cloud.broker.port),
    ]
    log = (out / "logs" / f"plant-{site.name}.log").open("wb")
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)


def start_bridge(site: Site, out: Path) -> subprocess.Popen[bytes]:
    config = site.config.parent / "bridge.toml"
    deadline = time.monotonic() + 60
    while not config.exists():
        if time.monotonic() > deadline:
            raise SystemExit(f"{site.name}: the simulator wrote no {config}; see {out / 'logs'}")
        time.sleep(0.2)
    log = (out / "logs" / f"bridge-{site.name}.log").open("wb")
    return subprocess.Popen(
        [str(BIN / "fedgate-bridge"), "run", "--config", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def configure_live_agent(site: Site, args: argparse.Namespace) -> None:
    """What an operator sets for live training: the buffer as the training source, the
    windows, and the topics to ingest (an array of tables, edited in the file)."""
    period = SAMPLE_MINUTES * 60 / args.speed  # wall seconds between samples
    for key, value in {
        "windows.tags": ",".join(FEATURE_TAGS),
        "windows.period_s": str(period),
        "windows.max_gap_s": str(3 * period),
        "windows.label_tag": "FAULT",
        "windows.stride": "2",
        "windows.test_fraction": "0",
        "training.source": "buffer",  # last: it needs windows.tags
    }.items():
        set_config_value(site.config, key, value)
    raw = tomllib.loads(site.config.read_text())
    raw["mqtt_source"] = [{"topic": f"plant/{site.name}/+/+", "format": "json"}]
    site.config.write_text(tomli_w.dumps(raw))
    load_config(site.config, env={})  # the edited file must still validate


def buffered_windows(site: Site) -> int:
    """Training windows the site's buffer gives now (`fedgate-agent windows`)."""
    result = subprocess.run(
        [str(BIN / "fedgate-agent"), "windows", "--config", str(site.config), "--json"],
        check=False,
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        return 0
    windows: int = json.loads(result.stdout)["train_windows"]
    return windows


def wait_for_data(sites: list[Site], processes: list[subprocess.Popen[bytes]], args: Any) -> None:
    """Until every site's buffer holds --warmup-hours of plant time; one progress line
    per site every few seconds."""
    period = SAMPLE_MINUTES * 60 / args.speed
    wanted = int(args.warmup_hours * 60 / SAMPLE_MINUTES)
    deadline = time.monotonic() + 60 + 3 * wanted * period
    while True:
        if any(p.poll() is not None for p in processes):
            raise SystemExit("a plant, bridge or agent exited; see the logs")
        counts = {}
        for site in sites:
            status = json.loads((site.config.parent / "status.json").read_text())
            buffer = ((status.get("ingest") or {}).get("buffer")) or {}
            counts[site.name] = buffer.get("samples", 0) // (len(FEATURE_TAGS) + 1)
        print(
            "      plant samples buffered: "
            + ", ".join(f"{name} {count}" for name, count in counts.items()),
            flush=True,
        )
        if min(counts.values()) >= wanted:
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"sites did not buffer {wanted} samples in time: {counts}")
        time.sleep(5)


def numbered_readings(site: Site) -> int:
    """Readings the site's bridge numbered: the sum of its topics' next sequence numbers."""
    outbox = site.config.parent / "bridge" / "outbox.db"
    with contextlib.closing(sqlite3.connect(f"file:{outbox}?mode=ro", uri=True)) as db:
        (total,) = db.execute("SELECT COALESCE(SUM(next_seq), 0) FROM streams").fetchone()
    return int(total)


def settled_ingest_rows(sites: list[Site], timeout_s: float = 30) -> list[list[Any]]:
    """The ingest table once every agent's buffer holds what its bridge numbered (or the
    timeout passed: then the difference shows in the "missing" column)."""
    deadline = time.monotonic() + timeout_s
    while True:
        rows = ingest_rows(sites)
        if all(row[5] == row[3] for row in rows) or time.monotonic() > deadline:
            return rows
        time.sleep(2)


def ingest_rows(sites: list[Site]) -> list[list[Any]]:
    rows = []
    for site in sites:
        status = run_cli("fedgate-agent", "status", "--config", str(site.config))
        numbered = numbered_readings(site)
        ingest = status.get("ingest") or {}
        buffer = ingest.get("buffer", {})
        counters = buffer.get("counters", {})
        source = (ingest.get("sources") or [{}])[0]
        rows.append(
            [
                site.name,
                "modbus" if site.index % 2 == 0 else "opcua",
                site_fault(site.index),
                numbered,
                source.get("received", 0),
                buffer.get("samples", 0),
                numbered - buffer.get("samples", 0),
                source.get("duplicates", counters.get("duplicates", 0)),
                sum((source.get("rejected") or {}).values()),
                counters.get("rejected_full", 0) + counters.get("dropped_oldest", 0),
                status.get("rounds_trained", 0),
            ]
        )
    return rows


class PredictionCounter:
    """Counts the predictions each site publishes, read off its cloud's broker as a plant
    system (SCADA, historian) would read them."""

    def __init__(self, clouds: list[Any], deployment: str) -> None:
        self.counts: dict[str, int] = {}
        self._lock = threading.Lock()
        self._clients: list[mqtt.Client] = []
        for cloud in clouds:
            client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2)
            client.on_message = self._on_message
            client.connect(cloud.broker.host, cloud.broker.port, keepalive=30)
            client.subscribe(f"fedgate/{deployment}/{cloud.name}/site/+/predictions", qos=1)
            client.loop_start()
            self._clients.append(client)

    def _on_message(self, _c: mqtt.Client, _u: Any, message: mqtt.MQTTMessage) -> None:
        site = message.topic.split("/")[-2]
        with self._lock:
            self.counts[site] = self.counts.get(site, 0) + 1

    def close(self) -> None:
        for client in self._clients:
            client.disconnect()
            client.loop_stop()


def scoring_of(site: Site) -> dict[str, Any]:
    status = json.loads((site.config.parent / "status.json").read_text())
    scoring: dict[str, Any] = status.get("scoring") or {}
    return scoring


def wait_for_live_scoring(
    sites: list[Site], final_round: int, published: PredictionCounter, timeout_s: float = 240
) -> list[list[Any]]:
    """Until every agent scores live windows with the last decided model (its ONNX export
    runs in a child process after the model arrives) and its predictions reach the broker;
    then one row per site."""
    deadline = time.monotonic() + timeout_s
    wanted = 20
    while True:
        scoring = {site.name: scoring_of(site) for site in sites}
        ready = {
            name: s.get("model_round") == final_round and s.get("windows_scored", 0) >= wanted
            for name, s in scoring.items()
        }
        if all(ready.values()) or time.monotonic() > deadline:
            break
        print(
            "      scoring: "
            + ", ".join(
                f"{name} {s.get('state')} (model round {s.get('model_round')}, "
                f"{s.get('windows_scored', 0)} windows)"
                for name, s in scoring.items()
            ),
            flush=True,
        )
        time.sleep(5)
    rows = []
    for site in sites:
        s = scoring[site.name]
        last = s.get("last_prediction") or {}
        rows.append(
            [
                site.name,
                s.get("model_round"),
                f"{s.get('parity_max_abs_diff') or 0:.1e}",
                s.get("export_seconds"),
                s.get("windows_scored", 0),
                published.counts.get(site.name, 0),
                last.get("predicted_class", "-"),
                last.get("anomaly_score", "-"),
                s.get("alerts_raised", 0),
                sum((s.get("errors") or {}).values()),
            ]
        )
    return rows


SCORING_HEADERS = [
    "site",
    "model round",
    "ONNX parity",
    "export s",
    "windows scored",
    "on broker",
    "last class",
    "anomaly",
    "alerts",
    "errors",
]


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clouds", type=int, default=2, help="clouds (coordinators, brokers)")
    parser.add_argument("--sites", type=int, default=None, help="default: 3 per cloud")
    parser.add_argument("--rounds", type=int, default=6, help="federated rounds (heights)")
    parser.add_argument("--speed", type=float, default=1800.0, help="plant seconds per second")
    parser.add_argument("--control-seconds", type=float, default=9.0)
    parser.add_argument("--onset-hours", type=float, default=4.0, help="fault start (plant h)")
    parser.add_argument(
        "--warmup-hours", type=float, default=12.0, help="plant hours buffered before round 1"
    )
    parser.add_argument("--eval-hours", type=float, default=8.0, help="per held-out run")
    parser.add_argument("--dp", choices=("off", "record"), default="off")
    parser.add_argument("--epsilon", type=float, default=8.0, help="record-level ε budget")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--reproducible",
        action="store_true",
        help="with --dp record, seed every agent too (training.seed), so that runs repeat: "
        "the DP noise can then be regenerated and protects nothing (the agents warn)",
    )
    parser.add_argument("--out", type=Path, default=None, help="default: out/demo-live")
    args = parser.parse_args()
    if args.sites is None:
        args.sites = 3 * args.clouds
    if args.clouds < 1 or args.sites < 2 * args.clouds:
        parser.error("every cloud needs at least 2 sites (secure aggregation)")
    return args


def main() -> int:
    args = parse_arguments()
    torch.set_num_threads(1)
    out: Path = args.out or ROOT / "out" / "demo-live"
    shutil.rmtree(out, ignore_errors=True)
    (out / "logs").mkdir(parents=True)
    started_all = time.monotonic()
    deployment = f"demo-live-{int(time.time())}"
    faults = [site_fault(i) for i in range(args.sites)]
    names = [f"c{index + 1}" for index in range(args.clouds)]
    processes: list[subprocess.Popen[bytes]] = []
    with cloud_brokers(names, out / "brokers") as endpoints, ThreadPoolExecutor(1) as side:
        evaluation = side.submit(evaluation_set, sorted(set(faults)), args)
        clouds = [
            Cloud(name=name, broker=endpoint, state=out / name)
            for name, endpoint in zip(names, endpoints, strict=True)
        ]
        print(
            f"[1/6] {plural(args.clouds, 'broker')}: "
            + ", ".join(f"{c.name} at {c.broker.address}" for c in clouds),
            flush=True,
        )
        spec_file = out / "model-spec.json"
        spec_file.write_bytes(msgspec.json.encode(tep_model_spec(WINDOW)))
        plan = plan_section(ROUNDS)
        setup = Setup(
            deployment=deployment,
            out=out,
            spec_file=spec_file,
            plan=plan,
            genesis_weights=None,  # the seed's random weights
            seed=args.seed,
            rounds=args.rounds,
            aggregation="secagg",
            dp=args.dp,
            epsilon=args.epsilon,
            site_epsilon=0.0,  # no site-level DP here
            seed_agents=agents_seeded(args.dp, args.reproducible),
        )
        sites = demo_sites(args.sites, clouds, out)
        with ThreadPoolExecutor(SETUP_WORKERS) as pool:
            manifest = set_up_federation(clouds, sites, setup, pool)
            list(pool.map(pin_manifest, sites))
            list(pool.map(lambda s: configure_live_agent(s, args), sites))
        print(
            f"[2/6] {plural(args.clouds, 'coordinator')} in one federation "
            f"({tolerance_text(args.clouds)}); {args.sites} agents enrolled, training from "
            "their buffers",
            flush=True,
        )
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        stores: list[Store] = []
        try:
            configs = [site.config for site in sites]
            for config in configs:
                with (out / "logs" / f"{config.parent.name}.log").open("wb") as log:
                    processes.append(
                        subprocess.Popen(
                            [str(BIN / "fedgate-agent"), "run", "--config", str(config)],
                            stdout=log,
                            stderr=subprocess.STDOUT,
                            env=env,
                        )
                    )
            wait_until_connected(configs, processes, out)
            plants = [start_plant(site, args, out) for site in sites]
            processes.extend(plants)
            bridges = [start_bridge(site, out) for site in sites]
            processes.extend(bridges)
            for site in sites:
                print(
                    f"      {site.name} ({site.cloud.name}): plant seed "
                    f"{args.seed * 100 + site.index + 1}, IDV{site_fault(site.index)} from "
                    f"{args.onset_hours} h, served over "
                    f"{'Modbus TCP' if site.index % 2 == 0 else 'OPC-UA'} → bridge → "
                    f"plant/{site.name}/+/+",
                    flush=True,
                )
            print(
                f"[3/6] agents subscribed; {args.sites} plants at {args.speed:g}× and their "
                "bridges started",
                flush=True,
            )
            print(
                f"[4/6] waiting until every buffer holds {args.warmup_hours:g} plant hours",
                flush=True,
            )
            wait_for_data(sites, processes, args)
            test = evaluation.result()
            print(
                f"      held-out evaluation: {len(test)} windows from other runs of the plant "
                f"(classes {sorted(set(test.y.tolist()))})",
                flush=True,
            )
            start_coordinators(clouds, args.rounds, out, env)
            processes.extend(c.process for c in clouds if c.process is not None)
            stores = [Store.open(cloud.database_url, migrate=False) for cloud in clouds]
            started = time.monotonic()
            print(
                f"[5/6] {args.rounds} heights; each round re-cuts the growing buffers", flush=True
            )
            published = PredictionCounter(clouds, deployment)
            rows, _ = follow_heights(clouds, stores, manifest, test, configs, args, out)
            for cloud in clouds:
                if cloud.process is not None:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        cloud.process.wait(timeout=60)
            fed_seconds = time.monotonic() - started
            print(
                "[live scoring] every agent exports the certified model to ONNX and scores "
                "each new window with onnxruntime",
                flush=True,
            )
            scoring_table = wait_for_live_scoring(sites, len(rows), published)
            published.close()
            print(format_table(SCORING_HEADERS, scoring_table), flush=True)
            print("[6/6] plants stopped; every site's data path once drained", flush=True)
            for plant in plants:
                plant.send_signal(signal.SIGTERM)
            for plant in plants:
                plant.wait(timeout=30)
            table = settled_ingest_rows(sites)
        finally:
            for store in stores:
                store.close()
            stop_all(processes)
    headers = [
        "site",
        "via",
        "fault",
        "bridge numbered",
        "agent received",
        "buffered",
        "missing",
        "duplicates",
        "malformed",
        "lost at cap",
        "rounds trained",
    ]
    print(format_table(headers, table))
    accuracy = float(rows[-1][7]) if rows else 0.0
    summary = {
        "deployment": deployment,
        "clouds": args.clouds,
        "sites": args.sites,
        "site_faults": {s.name: site_fault(s.index) for s in sites},
        "speed": args.speed,
        "heights_decided": len(rows),
        "held_out_windows": len(test),
        "final_accuracy": accuracy,
        "federated_seconds": round(fed_seconds, 1),
        "total_seconds": round(time.monotonic() - started_all, 1),
        "ingest": [dict(zip(headers, row, strict=True)) for row in table],
        "scoring": [dict(zip(SCORING_HEADERS, row, strict=True)) for row in scoring_table],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(
        f"[result] {len(rows)} of {args.rounds} heights decided; held-out accuracy of the last "
        f"model {accuracy:.3f} on {len(test)} windows; total {summary['total_seconds']} s"
    )
    print(f"summary: {shown(out / 'summary.json')}")
    print(f"inspect: .venv/bin/fedgate-agent status --config {shown(sites[0].config)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
