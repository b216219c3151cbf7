"""`make demo`: four clouds, twelve agents on non-IID Tennessee Eastman splits, 20 rounds.

Each cloud has its own MQTT broker, its own coordinator and its own SQLite store; the
sites are spread over the clouds, 3 per cloud by default: a cloud's secure aggregation
then shares keys 2-of-3 and survives one agent dropping out (with 2 agents it would be
2-of-2, and either agent could subtract its own update from the per-cloud mean that its
coordinator publishes for its peers, and so learn the other's). The coordinators join one
federation manifest that all of them sign. Every federated round is one consensus height:
each cloud runs a secure-aggregation round (SecAgg+) with its own agents, the coordinators
exchange their signed per-cloud aggregates and decide the next global model by BFT
consensus (Tendermint); agents take only models with a commit certificate of a quorum of
the manifest's coordinators. After each height the demo prints the decided model, the
consensus round, the clouds that signed its certificate, its test accuracy and the ε spent.

Every agent trains with record-level DP (DP-SGD, ε = 3 at δ = 1e-5 per site over the run)
by default, its batches and noise drawn from ChaCha20 keyed by the OS as in production;
``--reproducible`` seeds them instead, so that runs repeat (the noise then protects nothing).
``--record-noise pooled`` pools the record-level noise in each cloud's secure sum instead
(one clipped step a round, 40 heights, heavy-ball momentum on the decided models;
docs/privacy.md §3.7). ``--dp site`` adds site-level distributed noise instead (coordinator.toml
``[privacy] site_level = "on"``), ``--dp off`` trains without DP, and ``--aggregation
plaintext`` runs the baseline with the same seeds (``--seed``), so final accuracies compare.
``--clouds 1`` runs a single cloud. At the end the same model is trained centrally on the
union of the sites' data, and by plain FedAvg on the same sites (no DP, no secure
aggregation, the coordinator's default plan; in this process with the privacy benchmark's
simulator, cached in ``out/cache``); the three accuracies are printed and written to
``out/demo/summary.json``.

The federation starts from a genesis model pre-trained on public data (``--genesis
pretrained``, the default): plant runs simulated by ``fedgate-bridge simulate-runs``,
``fedgate-agent pretrain`` on them, and the manifest names the weights file
(``federation init --genesis-weights``). Nothing in the simulated runs comes from a site,
so this costs no privacy. The runs and the weights are cached in ``out/cache`` (the first
run simulates for a few minutes). ``--genesis random`` starts from the seed's random
weights instead. The centralized comparison starts from the same genesis.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import inspect
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import numpy.typing as npt
import tomli_w
import torch
from demo_broker import BrokerEndpoint, cloud_brokers  # this script's directory is on sys.path
from fedgate_agent.config import set_config_value
from fedgate_agent.datasets.tep import (
    FederatedSplit,
    centralized_dataset,
    federated_split,
    write_site_files,
)
from fedgate_agent.model import build_model
from fedgate_agent.privacy_ledger import read_ledger
from fedgate_agent.training import LocalDataset, evaluate, train_locally
from fedgate_common.consensus.manifest import decode_manifest_file, verify_keys
from fedgate_common.consensus.quorum import tolerance_text
from fedgate_common.consensus.wire import content_aggregates, open_proposal
from fedgate_common.envelope import open_envelope
from fedgate_common.errors import FedgateError
from fedgate_common.genesis_weights import read_genesis_weights
from fedgate_common.model_spec import ModelSpec, initial_weights
from fedgate_common.text_table import format_table
from fedgate_coordinator.rounds import RoundSettings
from fedgate_coordinator.store import RECORD_UNIT, DecisionRecord, PrivacyLedgerEntry, Store

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT))  # the plain FedAvg baseline is the privacy benchmark's simulator
from bench.privacy.federation import run_fedavg  # noqa: E402

BIN = Path(sys.executable).parent
ROUND_DEFAULTS = RoundSettings()  # the coordinator's defaults; the baseline uses the same
# The training plan under record-level DP: large Poisson batches, few steps, a small clip
# and a large learning rate (bench/privacy/README.md has the tuning behind it).
DP_ROUNDS = RoundSettings(
    learning_rate=1.0, lr_decay=0.9, momentum=0.9, local_epochs=2, batch_size=256
)
DP_CLIP = 1.0  # privacy.max_grad_norm
# With the record-level noise pooled in each cloud's secure sum (--record-noise pooled,
# privacy.md 3.7): one DP-SGD step a round over about 1,000 windows per site, a constant
# step, and heavy-ball momentum on the decided models (bench/privacy/pooled_noise.py).
POOLED_ROUNDS = RoundSettings(
    learning_rate=2.0, lr_decay=1.0, momentum=0.0, local_epochs=1, batch_size=1000
)
POOLED_MOMENTUM = 0.8  # the manifest's server_momentum
POOLED_HEIGHTS = 40  # --rounds with pooled noise, unless given
# Tendermint timeouts for coordinators on one machine (the manifest's defaults are sized
# for clouds far apart). aggregate_wait_s is how long a coordinator holding a quorum of
# aggregates waits for the rest before proposing: each cloud's round ends when its
# slowest agent has sent its masked update, and a cloud whose aggregate misses the
# proposal has trained for nothing in that height. On 2 busy cores the four aggregates
# of a height arrived within 0.7 s of each other; it only costs time when a cloud is down.
CONSENSUS = {
    "timeout_propose_s": 5.0,
    "timeout_prevote_s": 2.0,
    "timeout_precommit_s": 2.0,
    "timeout_delta_s": 2.0,
    "aggregate_wait_s": 10.0,
}
TIME_LIMIT_S = 1800
SETUP_WORKERS = 4  # CLI processes at a time while setting up


@dataclass
class Cloud:
    """One cloud of the demo: its broker and its coordinator (state directory, process)."""

    name: str
    broker: BrokerEndpoint
    state: Path
    public_key: str = ""
    database_url: str = ""
    process: subprocess.Popen[bytes] | None = None

    def coordinator(self, *args: str) -> dict[str, Any]:
        return run_cli("fedgate-coordinator", "--state-dir", str(self.state), *args)


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def shown(path: Path) -> Path:
    return path.relative_to(ROOT) if path.is_relative_to(ROOT) else path


def run_cli(*args: str, progress: bool = False) -> dict[str, Any]:
    """Run a fedgate CLI command with ``--json``; exit with its message if it fails. With
    ``progress``, the command's progress lines (stderr) show on the terminal."""
    result = subprocess.run(
        [str(BIN / args[0]), *args[1:], "--json"],
        check=False,
        stdout=subprocess.PIPE,
        stderr=None if progress else subprocess.PIPE,
        text=True,
    )
    if result.returncode != 0:
        shown_error = "see above" if progress else result.stderr
        raise SystemExit(f"{' '.join(args[:5])} failed ({result.returncode}): {shown_error}")
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def accuracy_of(store: Store, digest: str, test: LocalDataset) -> float:
    record = store.get_model(digest)
    if record is None:
        raise SystemExit(f"model {digest[:16]} is not in the store")
    model = build_model(record.decode_spec(), weights=record.decode_weights())
    return evaluate(model, test).accuracy


def record_epsilon(configs: list[Path], up_to: int | None = None) -> float:
    """The largest record-level ε any site has spent by round ``up_to`` (each site's
    privacy.json; agents of a fast cloud may already have trained the next round)."""
    spent = []
    for config in configs:
        entries = read_ledger(config.parent).entries
        booked = [e for e in entries if up_to is None or e.spend.round <= up_to]
        spent.append(booked[-1].epsilon_total if booked else 0.0)
    return round(max(spent, default=0.0), 4)


def own_share_epsilon(configs: list[Path], delta: float) -> float | None:
    """With pooled noise: the largest record-level ε any site would have spent if the other
    inputs of its cloud's secure sums had colluded with the coordinator (its own share
    alone; None without pooled rounds)."""
    spent = []
    for config in configs:
        ledger = read_ledger(config.parent)
        if ledger.pooled:
            spent.append(ledger.own_share_epsilon(delta, "pld"))
    return round(max(spent), 4) if spent else None


def site_epsilon(stores: list[Store], height: int) -> float | None:
    """The largest site-level ε any cloud has booked by ``height`` (its privacy_ledger)."""
    spent = [
        entry.epsilon_total
        for store in stores
        for entry in store.privacy_ledger(unit="site")
        if entry.round <= height
    ]
    return round(max(spent), 4) if spent else None


def wait_until_connected(
    configs: list[Path], processes: list[subprocess.Popen[bytes]], out: Path, timeout: float = 300
) -> None:
    """Wait until every agent has connected to its broker (its status.json says so), so
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
            raise SystemExit(f"an agent exited at start; see {out / 'logs'}")
        if waiting and time.monotonic() > deadline:
            raise SystemExit(f"agents not connected after {timeout:.0f} s: {waiting}")
        time.sleep(0.5)


def configure_coordinator(state_dir: Path, changes: dict[str, dict[str, Any]]) -> None:
    """Edit coordinator.toml as an operator would: set keys in its sections."""
    path = state_dir / "coordinator.toml"
    config = tomllib.loads(path.read_text())
    for section, values in changes.items():
        config.setdefault(section, {}).update(values)
    path.write_text(tomli_w.dumps(config))


@dataclass(frozen=True)
class Setup:
    """What every cloud's and site's set-up needs to know about the run.

    Both demos build one from their own command line; the fields are spelled out (not the
    parsed arguments) so that a choice one demo does not offer is a type error, not an
    AttributeError half-way through the set-up.
    """

    deployment: str
    out: Path
    spec_file: Path
    plan: dict[str, Any]  # coordinator.toml [rounds]: the training plan
    genesis_weights: Path | None  # the pre-trained genesis, or None: the seed's random one
    seed: int
    rounds: int
    aggregation: str  # "secagg" or "plaintext"
    dp: str  # "record", "site" or "off"
    epsilon: float  # record-level budget per site
    site_epsilon: float  # site-level budget of each cloud
    seed_agents: bool  # training.seed on every agent: see agents_seeded
    # "local" (each agent noises its own DP-SGD steps) or "pooled" (the secure sum's shares)
    record_noise: str = "local"
    record_sample_rate: float = 0.0  # pooled: the largest rate a site samples its windows at
    min_participants: int = 0  # per cloud; 0: max(2, its agents - 2)

    @property
    def pooled(self) -> bool:
        return self.dp == "record" and self.record_noise == "pooled"

    def genesis_options(self) -> tuple[str, ...]:
        """What `init` and `federation init` take to start from this run's genesis."""
        if self.genesis_weights is None:
            return ("--genesis-seed", str(self.seed))
        return ("--genesis-weights", str(self.genesis_weights))


@dataclass
class Site:
    """One gateway: its agent's configuration file, its cloud and its enrolled key."""

    index: int
    cloud: Cloud
    config: Path
    public_key: str = ""

    @property
    def name(self) -> str:
        return f"site-{self.index + 1}"


def init_coordinator(cloud: Cloud, agents: int, setup: Setup) -> None:
    """`fedgate-coordinator init` with its own store, then the run's coordinator.toml edits."""
    init = cloud.coordinator(
        "init",
        "--cloud",
        cloud.name,
        "--deployment",
        setup.deployment,
        "--broker-host",
        cloud.broker.host,
        "--broker-port",
        str(cloud.broker.port),
        "--min-participants",
        str(setup.min_participants or max(2, agents - 2)),
        "--update-timeout",
        "120",
        "--model-spec",
        str(setup.spec_file),
        "--aggregation",
        setup.aggregation,
        *setup.genesis_options(),
    )
    cloud.public_key = init["coordinator_public_key"]
    cloud.database_url = init["database_url"]
    changes: dict[str, dict[str, Any]] = {"rounds": setup.plan}
    if setup.dp == "site":
        changes["privacy"] = {
            "site_level": "on",
            "target_epsilon": setup.site_epsilon,
            "planned_rounds": setup.rounds,
        }
        changes["secagg"] = {"word_bits": 32}
    if setup.pooled:
        changes["privacy"] = {
            "record_level": "pooled",
            "record_epsilon": setup.epsilon,
            "record_clip_norm": DP_CLIP,
            "record_sample_rate": setup.record_sample_rate,
            "planned_rounds": setup.rounds,
        }
        changes["secagg"] = {"word_bits": 32}
    configure_coordinator(cloud.state, changes)


def init_agent(site: Site, setup: Setup) -> None:
    """`fedgate-agent init` for the site's cloud and broker, then the run's settings."""
    cloud = site.cloud
    agent = run_cli(
        "fedgate-agent",
        "init",
        "--config",
        str(site.config),
        "--agent-id",
        site.name,
        "--deployment",
        setup.deployment,
        "--cloud",
        cloud.name,
        "--state-dir",
        str(site.config.parent),
        "--broker-host",
        cloud.broker.host,
        "--broker-port",
        str(cloud.broker.port),
        "--coordinator-key",
        cloud.public_key,
    )
    site.public_key = agent["public_key"]
    settings = {}
    if setup.seed_agents:
        settings["training.seed"] = str(setup.seed * 1000 + site.index)
    if setup.aggregation == "plaintext":
        settings["secagg.plaintext_rounds"] = "allow"  # agents refuse it by default
    if setup.dp == "site":
        # Each agent's own count of the site-level noise it sends: the federation's budget.
        settings["privacy.site_max_epsilon"] = str(setup.site_epsilon)
    if setup.dp == "record":
        settings["privacy.record_level"] = "on"
        settings["privacy.target_epsilon"] = str(setup.epsilon)
        settings["privacy.planned_rounds"] = str(setup.rounds)
        settings["privacy.max_grad_norm"] = str(DP_CLIP)
        settings["privacy.record_noise"] = setup.record_noise
    for key, value in settings.items():
        set_config_value(site.config, key, value)  # what `fedgate-agent config set` does


def agents_seeded(dp: str, reproducible: bool) -> bool:
    """Whether the agents get a ``training.seed`` (batches, and DP noise, repeat from it).

    With record-level DP they do not, unless ``--reproducible``: a seeded agent's noise can
    be regenerated and protects nothing, so by default the demo's agents draw their batches
    and noise from ChaCha20 keyed by the OS, as in production (docs/privacy.md §5).
    """
    return reproducible or dp != "record"


def enroll_agents(cloud: Cloud, sites: list[Site]) -> None:
    """Enroll the cloud's agents at its coordinator, one after the other (one store)."""
    for site in sites:
        if site.cloud is cloud:
            cloud.coordinator("enroll", site.name, site.public_key)


def pin_manifest(site: Site) -> None:
    """Pin the manifest installed at the site's coordinator: from now on the agent takes
    only models certified by a quorum of the manifest's coordinators."""
    run_cli(
        "fedgate-agent",
        "federation",
        "pin",
        "--config",
        str(site.config),
        str(site.cloud.state / "federation.json"),
    )


def form_federation(clouds: list[Cloud], setup: Setup, pool: ThreadPoolExecutor) -> Path:
    """One manifest for all clouds: written by c1, short timeouts set before anyone signs,
    signed by every coordinator (a first version needs all), installed on every one. A
    pre-trained genesis's weights file goes with it to every cloud."""
    manifest = setup.out / "federation.json"
    entries = [f"--cloud={c.name}={c.public_key}@{c.broker.address}" for c in clouds]
    genesis = setup.genesis_options()
    momentum = ("--server-momentum", str(POOLED_MOMENTUM)) if setup.pooled else ()
    clouds[0].coordinator(
        "federation", "init", *entries, *genesis, *momentum, "--out", str(manifest)
    )
    unsigned = json.loads(manifest.read_text())
    unsigned["manifest"]["consensus"].update(CONSENSUS)
    manifest.write_text(json.dumps(unsigned, indent=2))
    weights = genesis if setup.genesis_weights is not None else ()
    for cloud in clouds:  # one after the other: each adds its signature to the file
        cloud.coordinator("federation", "sign", str(manifest), *weights)
    install = ("federation", "install", str(manifest), "--replace", *weights)
    list(pool.map(lambda c: c.coordinator(*install), clouds))
    return manifest


def included_clouds(stores: list[Store], decision: DecisionRecord, manifest: Path) -> str:
    """The clouds whose signed aggregates the decided proposal combined (from the
    proposal a coordinator recorded in its votes table)."""
    signed = decode_manifest_file(manifest.read_bytes()).manifest
    keys = verify_keys(signed)
    for store in stores:
        for vote in store.votes(decision.height):
            if (vote.step, vote.round, vote.value) != ("proposal", decision.round, decision.value):
                continue
            try:
                proposal = open_proposal(vote.envelope, deployment=signed.deployment, keys=keys)
                raws = content_aggregates(proposal.proposal.content)
                return ",".join(sorted(open_envelope(raw).sender for raw in raws))
            except FedgateError:
                continue
    return "?"


def aggregate_spread(stores: list[Store], height: int) -> float | None:
    """Seconds between the first and the last cloud aggregate c1 received for ``height``."""
    times = [a.received_at for a in stores[0].cloud_aggregates(height) if a.received_at]
    if len(times) < 2:
        return None
    return round((max(times) - min(times)).total_seconds(), 1)


def height_row(
    height: int,
    clouds: list[Cloud],
    stores: list[Store],
    manifest: Path,
    test: LocalDataset,
    configs: list[Path],
    dp: str,
) -> list[Any] | None:
    """The row of ``height`` once every cloud has stored its decision, else ``None``."""
    decisions = [store.decision(height) for store in stores]
    first = decisions[0]
    if first is None or any(d is None for d in decisions):
        return None
    digests = {d.value for d in decisions if d is not None}
    local = [store.get_round(height) for store in stores]
    completed = [r for r in local if r is not None and r.status == "completed"]
    parts = [p for store in stores for p in store.participants(height)]
    return [
        height,
        first.value[:12] if len(digests) == 1 else "DIFFER",
        first.round,
        ",".join(first.signers),
        included_clouds(stores, first, manifest),
        f"{len(completed)}/{len(clouds)}",
        sum(r.participants or 0 for r in completed),
        accuracy_of(stores[0], first.value, test),
        int(np.mean([p.bytes_up for p in parts])) if parts else 0,
        int(np.mean([r.bytes_down_per_agent or 0 for r in completed])) if completed else 0,
        record_epsilon(configs, up_to=height) if dp == "record" else "-",
        site_epsilon(stores, height) if dp == "site" else "-",
    ]


def start_coordinators(clouds: list[Cloud], rounds: int, out: Path, env: dict[str, str]) -> None:
    """`fedgate-coordinator serve --until-height`: every cloud stops at the same height."""
    for cloud in clouds:
        with (out / "logs" / f"coordinator-{cloud.name}.log").open("wb") as log:
            cloud.process = subprocess.Popen(
                [
                    str(BIN / "fedgate-coordinator"),
                    "--state-dir",
                    str(cloud.state),
                    "serve",
                    "--until-height",
                    str(rounds),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )


def follow_heights(
    clouds: list[Cloud],
    stores: list[Store],
    manifest: Path,
    test: LocalDataset,
    configs: list[Path],
    args: argparse.Namespace,
    out: Path,
) -> tuple[list[list[Any]], dict[int, float | None]]:
    """Print a row per height as soon as every cloud has decided it; stop early when a
    coordinator fails or all have exited. Returns the rows and the aggregates' spread."""
    print(format_table(HEADERS, []), flush=True)
    rows: list[list[Any]] = []
    spreads: dict[int, float | None] = {}
    started = time.monotonic()
    height = 1
    while height <= args.rounds:
        exited = all(c.process is not None and c.process.poll() is not None for c in clouds)
        failed = any(c.process is not None and c.process.poll() for c in clouds)
        row = height_row(height, clouds, stores, manifest, test, configs, args.dp)
        if row is not None:
            rows.append(row)
            spreads[height] = aggregate_spread(stores, height)
            print(format_table(HEADERS, [row]).splitlines()[-1], flush=True)
            height += 1
            continue
        if failed or exited:
            break
        if time.monotonic() - started > TIME_LIMIT_S:
            raise SystemExit(f"no result after {TIME_LIMIT_S} s; see {out / 'logs'}")
        time.sleep(1.0)
    return rows, spreads


HEADERS = [
    "height",
    "model digest",
    "cons_round",
    "precommits from",
    "aggregates of",
    "clouds done",
    "agents",
    "test_acc",
    "up/agent",
    "down/agent",
    "record_eps",
    "site_eps",
]


def genesis_weights_of(spec: ModelSpec, setup: Setup) -> dict[str, npt.NDArray[np.float32]]:
    """The federation's genesis model: the pre-trained weights file, or the seed's random
    weights (those `init --genesis-seed` draws)."""
    if setup.genesis_weights is None:
        return initial_weights(spec, np.random.default_rng(setup.seed))
    return read_genesis_weights(setup.genesis_weights).named_weights()


def centralized(
    train: LocalDataset,
    test: LocalDataset,
    spec: Any,
    plan: RoundSettings,
    rounds: int,
    setup: Setup,
) -> float:
    """The same model and optimiser, trained on the union for as many epochs as one site
    trains in the whole federation (rounds × local epochs), with the same lr decay, from
    the federation's genesis model."""
    model = build_model(spec, weights=genesis_weights_of(spec, setup))
    for number in range(1, rounds + 1):
        train_locally(model, train, plan.plan_for(number), seed=number)
    return evaluate(model, test).accuracy


# The modules whose code decides plain_fedavg's result: a change to any of them is a new
# cache key, so an older cached result is never read back for different code.
PLAIN_FEDAVG_CODE = (
    "bench.privacy.federation",
    "fedgate_agent.datasets.tep",
    "fedgate_agent.model",
    "fedgate_agent.training",
    "fedgate_common.model_spec",
    "fedgate_coordinator.aggregation",
    "fedgate_coordinator.rounds",
)


def code_digest(modules: tuple[str, ...]) -> str:
    """SHA-256 over the source files of ``modules`` (imported if they are not yet)."""
    digest = hashlib.sha256()
    for name in modules:
        source = inspect.getsourcefile(importlib.import_module(name))
        if source is None:
            raise FedgateError(f"no source file for {name}")
        digest.update(name.encode() + b"\0" + Path(source).read_bytes())
    return digest.hexdigest()


def plain_fedavg_cache(spec_file: Path, setup: Setup, *, sites: int, stride: int) -> Path:
    """Where :func:`plain_fedavg`'s result for this run's inputs is kept: out/cache, under a
    digest of everything the result depends on (``sites`` and ``stride`` made the split)."""
    genesis = (
        hashlib.sha256(setup.genesis_weights.read_bytes()).hexdigest()
        if setup.genesis_weights is not None
        else f"seed {setup.seed}"
    )
    key = {
        "code": code_digest(PLAIN_FEDAVG_CODE),
        "spec": hashlib.sha256(spec_file.read_bytes()).hexdigest(),
        "genesis": genesis,
        "sites": sites,
        "stride": stride,
        "rounds": setup.rounds,
        "seed": setup.seed,
        "plan": msgspec.to_builtins(ROUND_DEFAULTS),
        "torch": torch.__version__,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return ROOT / "out" / "cache" / f"plain-fedavg-{digest}.json"


def plain_fedavg(split: FederatedSplit, cache: Path, setup: Setup) -> tuple[float, float]:
    """Test accuracy and seconds of non-private FedAvg on the same sites: the coordinator's
    default plan, window-weighted means, no DP, no secure aggregation, no consensus, in this
    process (bench/privacy/federation.py, a worker per core), from the same genesis for as
    many rounds. Read from ``cache`` when it exists, else measured and written there."""
    if cache.exists():
        cached = json.loads(cache.read_text())
        return float(cached["accuracy"]), float(cached["seconds"])
    result = run_fedavg(
        split,
        ROUND_DEFAULTS,
        rounds=setup.rounds,
        seed=setup.seed,
        initial=genesis_weights_of(split.spec, setup),
        jobs=os.cpu_count() or 1,
        progress=lambda line: print(f"      plain FedAvg {line}", flush=True),
    )
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(
        json.dumps({"accuracy": result.accuracy, "seconds": round(result.seconds, 1)}, indent=2)
    )
    return result.accuracy, result.seconds


def pretrained_genesis(spec_file: Path, args: argparse.Namespace) -> Path:
    """The genesis model pre-trained on simulated plant runs, as an operator makes it:
    `fedgate-bridge simulate-runs`, then `fedgate-agent pretrain`. Both files are cached
    in out/cache by seed, number of sets and model spec, so later runs start at once."""
    cache = ROOT / "out" / "cache"
    runs = cache / f"plant-runs-seed{args.seed}-sets{args.public_sets}.npz"
    if runs.exists():
        print(f"      simulated plant runs: {shown(runs)} (cached)", flush=True)
    else:
        print(
            f"      simulating {args.public_sets} set(s) of 21 plant runs (normal operation "
            f"and faults 1-20, 25 h each) with fedgate-bridge simulate-runs",
            flush=True,
        )
        run_cli(
            "fedgate-bridge",
            "simulate-runs",
            "--out",
            str(runs),
            "--seed",
            str(args.seed),
            "--sets",
            str(args.public_sets),
            "--jobs",
            str(os.cpu_count() or 1),
            progress=True,
        )
    spec_digest = hashlib.sha256(spec_file.read_bytes()).hexdigest()[:12]
    weights = cache / f"genesis-seed{args.seed}-sets{args.public_sets}-{spec_digest}.msgpack"
    if weights.exists():
        print(f"      pre-trained genesis: {shown(weights)} (cached)", flush=True)
        return weights
    print("      pre-training the genesis model on them (fedgate-agent pretrain)", flush=True)
    trained = run_cli(
        "fedgate-agent",
        "pretrain",
        str(runs),
        "--out",
        str(weights),
        "--model-spec",
        str(spec_file),
        "--seed",
        str(args.seed),
        progress=True,
    )
    print(f"      genesis {str(trained['digest'])[:16]}: {shown(weights)}", flush=True)
    return weights


def plan_section(plan: RoundSettings) -> dict[str, Any]:
    """coordinator.toml [rounds] for ``plan``: the training plan every cloud runs."""
    return {
        "learning_rate": plan.learning_rate,
        "lr_decay": plan.lr_decay,
        "momentum": plan.momentum,
        "local_epochs": plan.local_epochs,
        "batch_size": plan.batch_size,
    }


def demo_sites(count: int, clouds: list[Cloud], out: Path) -> list[Site]:
    """The sites, spread over the clouds, each with its config under ``out/agents``."""
    return [
        Site(index=index, cloud=cloud, config=out / "agents" / f"site-{index + 1}" / "agent.toml")
        for index, cloud in enumerate(spread_sites(count, clouds))
    ]


def set_up_federation(
    clouds: list[Cloud], sites: list[Site], setup: Setup, pool: ThreadPoolExecutor
) -> Path:
    """Coordinators and agents initialised, agents enrolled, one manifest signed by every
    cloud and installed; returns the manifest (agents pin it next)."""
    list(pool.map(lambda c: init_coordinator(c, sum(s.cloud is c for s in sites), setup), clouds))
    list(pool.map(lambda s: init_agent(s, setup), sites))
    list(pool.map(lambda c: enroll_agents(c, sites), clouds))
    return form_federation(clouds, setup, pool)


def spread_sites(sites: int, clouds: list[Cloud]) -> list[Cloud]:
    """Each site's cloud: consecutive blocks, the first clouds take one more if uneven."""
    base, extra = divmod(sites, len(clouds))
    owners: list[Cloud] = []
    for index, cloud in enumerate(clouds):
        owners.extend([cloud] * (base + (1 if index < extra else 0)))
    return owners


def stop_all(processes: list[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clouds", type=int, default=4, help="clouds (coordinators, brokers)")
    parser.add_argument(
        "--sites", type=int, default=None, help="default: 3 per cloud, at least 6 in all"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help=f"federated rounds (heights); default 20, {POOLED_HEIGHTS} with --record-noise pooled",
    )
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
    parser.add_argument(
        "--record-noise",
        choices=("local", "pooled"),
        default="local",
        help="with --dp record: local (each agent adds the whole DP-SGD noise to its own "
        "steps) or pooled (one clipped step a round, the noise added once to each cloud's "
        "secure sum as the agents' shares, heavy-ball momentum on the decided models; "
        "docs/privacy.md 3.7)",
    )
    parser.add_argument("--site-epsilon", type=float, default=8.0, help="site-level ε budget")
    parser.add_argument(
        "--min-participants",
        type=int,
        default=0,
        help="inputs a cloud's round needs (its coordinator's rounds.min_participants); "
        "default: all its agents but 2, at least 2. Noise shares are sized for it: all of a "
        "cloud's agents tolerates no dropout and needs the least noise",
    )
    parser.add_argument(
        "--genesis",
        choices=("pretrained", "random"),
        default="pretrained",
        help="pretrained (default): start from a model pre-trained on simulated plant runs "
        "(public data, no privacy cost); random: from the seed's random weights",
    )
    parser.add_argument(
        "--plan",
        choices=("auto", "dp", "default"),
        default="auto",
        help="the training plan: dp (the one tuned for record-level DP: lr 1.0, decay 0.9, "
        "2 epochs, batch 256), default (the coordinator's), or auto: dp with --dp record, "
        "default otherwise. `--dp off --plan dp` is the same plan without DP.",
    )
    parser.add_argument(
        "--stride",
        type=int,
        default=1,
        help="samples between the starts of two windows of the sites' data and the test set; "
        "1 (default) is the agent's windows.stride default; 2 halves the windows (each "
        "reading then lies in up to 10 windows, not 20)",
    )
    parser.add_argument(
        "--public-sets",
        type=int,
        default=3,
        help="sets of 21 simulated runs to pre-train on (about 80 CPU-seconds each)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=1,
        help="fixes the initial model and, except under record-level DP without "
        "--reproducible, each site's training order, so runs compare",
    )
    parser.add_argument(
        "--reproducible",
        action="store_true",
        help="with --dp record, seed every agent too (training.seed), so that runs repeat: "
        "the DP noise can then be regenerated and protects nothing (the agents warn)",
    )
    args = parser.parse_args()
    if args.clouds < 1:
        parser.error("--clouds must be at least 1")
    if args.sites is None:
        args.sites = max(6, 3 * args.clouds)
    if args.sites < 4:
        parser.error(
            f"--sites {args.sites}: use at least 4 (each fault goes to 3 sites, and no site "
            "may see every fault)"
        )
    if args.sites < 2 * args.clouds:
        parser.error(
            f"--sites {args.sites} leaves a cloud with fewer than 2 agents: secure "
            "aggregation needs a Shamir threshold of at least 2"
        )
    if args.min_participants and not 2 <= args.min_participants <= args.sites // args.clouds:
        parser.error(
            f"--min-participants {args.min_participants}: use 2 to {args.sites // args.clouds} "
            "(the fewest agents a cloud has)"
        )
    if args.rounds is None:
        pooled = args.dp == "record" and args.record_noise == "pooled"
        args.rounds = POOLED_HEIGHTS if pooled else 20
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.public_sets < 1:
        parser.error("--public-sets must be at least 1")
    if args.stride < 1:
        parser.error("--stride must be at least 1")
    if args.dp == "site" and args.aggregation != "secagg":
        parser.error("--dp site needs --aggregation secagg: the agents add the noise")
    return args


def main() -> int:
    args = parse_arguments()
    torch.set_num_threads(1)
    suffix = ("" if args.aggregation == "secagg" else "-plaintext") + {
        "record": "",
        "site": "-site-dp",
        "off": "-no-dp",
    }[args.dp]
    record_plan = args.dp == "record" if args.plan == "auto" else args.plan == "dp"
    plan = DP_ROUNDS if record_plan else ROUND_DEFAULTS
    if record_plan and args.record_noise == "pooled":
        plan = POOLED_ROUNDS
    out: Path = args.out or ROOT / "out" / f"demo{suffix}"
    shutil.rmtree(out, ignore_errors=True)
    (out / "logs").mkdir(parents=True)
    deployment = f"demo-{int(time.time())}"
    started_all = time.monotonic()

    print(f"[1/6] splitting Tennessee Eastman data over {args.sites} sites (non-IID)", flush=True)
    split = federated_split(args.sites, stride=args.stride)
    print(f"      test set: {len(split.test)} windows, 22 classes")
    spec_file = out / "model-spec.json"
    spec_file.write_bytes(msgspec.json.encode(split.spec))
    plan_settings = plan_section(plan)
    genesis_weights = None
    if args.genesis == "pretrained":
        print("      genesis model: pre-trained on public (simulated) plant runs", flush=True)
        genesis_weights = pretrained_genesis(spec_file, args)
    else:
        print(f"      genesis model: random weights of seed {args.seed}", flush=True)

    names = [f"c{index + 1}" for index in range(args.clouds)]
    processes: list[subprocess.Popen[bytes]] = []
    with cloud_brokers(names, out / "brokers") as endpoints:
        clouds = [
            Cloud(name=name, broker=endpoint, state=out / name)
            for name, endpoint in zip(names, endpoints, strict=True)
        ]
        print(
            f"[2/6] {plural(args.clouds, 'broker')} ({endpoints[0].kind}): "
            + ", ".join(f"{c.name} at {c.broker.address}" for c in clouds),
            flush=True,
        )
        setup = Setup(
            deployment=deployment,
            out=out,
            spec_file=spec_file,
            plan=plan_settings,
            genesis_weights=genesis_weights,
            seed=args.seed,
            rounds=args.rounds,
            aggregation=args.aggregation,
            dp=args.dp,
            epsilon=args.epsilon,
            site_epsilon=args.site_epsilon,
            seed_agents=agents_seeded(args.dp, args.reproducible),
            record_noise=args.record_noise,
            record_sample_rate=max(
                min(1.0, POOLED_ROUNDS.batch_size / len(data)) for data in split.sites
            ),
            min_participants=args.min_participants,
        )
        sites = demo_sites(args.sites, clouds, out)
        # The CLIs take seconds to start (imports), so independent steps run side by side.
        with ThreadPoolExecutor(SETUP_WORKERS) as pool:
            manifest = set_up_federation(clouds, sites, setup, pool)
            print(
                f"[3/6] {plural(args.clouds, 'coordinator')} ({', '.join(names)}), each with "
                f"its own store, joined in {shown(manifest)} (signed by all): "
                f"{tolerance_text(args.clouds)}",
                flush=True,
            )
            list(pool.map(pin_manifest, sites))
        agent_configs = [site.config for site in sites]
        write_site_files(split, [config.parent for config in agent_configs])
        for site, data in zip(sites, split.sites, strict=True):
            faults = sorted(split.site_faults[site.index])
            print(f"      {site.name} ({site.cloud.name}): {len(data)} windows, faults {faults}")

        print(
            f"[4/6] set-up took {time.monotonic() - started_all:.0f} s; starting {args.sites} "
            f"agents, then {plural(args.clouds, 'coordinator')} "
            f"(serve --until-height {args.rounds})",
            flush=True,
        )
        if args.dp == "record":
            print(
                "      DP-SGD batches and noise: "
                + (
                    "seeded (--reproducible: runs repeat, the noise protects nothing)"
                    if setup.seed_agents
                    else "ChaCha20 keyed by the OS on every agent, as in production"
                ),
                flush=True,
            )
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        agents_started = time.monotonic()
        for config in agent_configs:
            with (out / "logs" / f"{config.parent.name}.log").open("wb") as log:
                processes.append(
                    subprocess.Popen(
                        [str(BIN / "fedgate-agent"), "run", "--config", str(config)],
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        env=env,
                    )
                )
        stores: list[Store] = []
        reported: list[PrivacyLedgerEntry] = []
        try:
            wait_until_connected(agent_configs, processes, out)
            connected_after = time.monotonic() - agents_started
            start_coordinators(clouds, args.rounds, out, env)
            processes.extend(c.process for c in clouds if c.process is not None)
            started = time.monotonic()
            stores = [Store.open(cloud.database_url, migrate=False) for cloud in clouds]
            print(
                f"[5/6] agents connected {connected_after:.0f} s after they started; "
                f"{args.rounds} heights, one global model each",
                flush=True,
            )
            rows, spreads = follow_heights(
                clouds, stores, manifest, split.test, agent_configs, args, out
            )
            for cloud in clouds:
                if cloud.process is not None:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        cloud.process.wait(timeout=60)
            fed_seconds = time.monotonic() - started
            chains = [store.verify_chain() for store in stores]
            reported = [e for store in stores for e in store.privacy_ledger(unit=RECORD_UNIT)]
        finally:
            for store in stores:
                store.close()
            stop_all(processes)
        failed = [c for c in clouds if c.process is None or c.process.returncode != 0]
        if failed:
            raise SystemExit(
                f"coordinator(s) {', '.join(c.name for c in failed)} exited with "
                f"{[c.process.returncode if c.process else None for c in failed]}; "
                f"see {out / 'logs'}"
            )
        with ThreadPoolExecutor(SETUP_WORKERS) as pool:
            reports = pool.map(lambda c: c.coordinator("status")["consensus"], clouds)
            statuses = dict(zip(names, reports, strict=True))

    finals = {name: (s["last_decision"] or {}).get("model") for name, s in statuses.items()}
    evidence = sum(len(s["evidence"]) for s in statuses.values())
    if len(set(finals.values())) != 1 or any(row[1] == "DIFFER" for row in rows):
        raise SystemExit(f"the clouds decided different models: {finals}")
    final_digest = next(iter(finals.values())) or ""
    fedavg_accuracy = float(rows[-1][7]) if rows else 0.0
    print(
        f"[6/6] the same model from the same genesis without the federation: centralized "
        f"on the union ({len(centralized_dataset(split))} windows), then plain FedAvg on "
        f"the same {args.sites} sites (no DP, no secure aggregation, the coordinator's "
        "default plan)",
        flush=True,
    )
    central_started = time.monotonic()
    central_accuracy = centralized(
        centralized_dataset(split), split.test, split.spec, plan, args.rounds, setup
    )
    central_seconds = time.monotonic() - central_started
    print(f"      centralized: {central_accuracy:.4f} ({central_seconds:.0f} s)", flush=True)
    cached = plain_fedavg_cache(spec_file, setup, sites=args.sites, stride=args.stride)
    if cached.exists():
        print(f"      plain FedAvg: cached in {shown(cached)}", flush=True)
    plain_accuracy, plain_seconds = plain_fedavg(split, cached, setup)
    print(f"      plain FedAvg: {plain_accuracy:.4f} ({plain_seconds:.0f} s)", flush=True)
    done = [row for row in rows if row[6]]
    bytes_up = int(np.mean([row[8] for row in done])) if done else 0
    bytes_down = int(np.mean([row[9] for row in done])) if done else 0
    float32_model = sum(int(np.prod(p.shape)) for p in build_model(split.spec).parameters()) * 4
    record_spent = record_epsilon(agent_configs) if args.dp == "record" else None
    summary = {
        "deployment": deployment,
        "clouds": args.clouds,
        "tolerance": tolerance_text(args.clouds),
        "consensus": CONSENSUS,
        "sites_per_cloud": {c.name: [s.name for s in sites if s.cloud is c] for c in clouds},
        "aggregation": args.aggregation,
        "record_level_dp": args.dp == "record",
        # Seeded agents repeat their batches and DP noise: no guarantee (privacy.md §5).
        "agents_seeded": setup.seed_agents,
        "record_epsilon_budget": args.epsilon if args.dp == "record" else None,
        "record_epsilon_spent": record_spent,
        "record_noise": args.record_noise if args.dp == "record" else None,
        # Pooled: what is left if a site's cloud-mates collude with its coordinator.
        "record_epsilon_own_share_only": own_share_epsilon(agent_configs, 1e-5)
        if setup.pooled
        else None,
        # What the agents reported with their updates, as the coordinators booked it.
        "record_epsilon_booked": round(max(e.epsilon_total for e in reported), 4)
        if reported
        else None,
        "record_epsilon_reporting_agents": len({e.agent for e in reported}),
        "site_level_dp": args.dp == "site",
        "site_epsilon_budget": args.site_epsilon if args.dp == "site" else None,
        "site_epsilon_spent": rows[-1][11] if args.dp == "site" and rows else None,
        "training_plan": plan_settings,
        "seed": args.seed,
        "stride": args.stride,
        "plan": "dp" if plan is DP_ROUNDS else "pooled" if plan is POOLED_ROUNDS else "default",
        "genesis": args.genesis,
        "genesis_weights": str(setup.genesis_weights) if setup.genesis_weights else None,
        "sites": args.sites,
        # --min-participants, or None: each cloud's agents but 2, at least 2
        "min_participants": setup.min_participants or None,
        "rounds_requested": args.rounds,
        "heights_decided": len(rows),
        "final_model": final_digest,
        "final_model_per_cloud": finals,
        "models_in_each_chain": chains,
        "evidence_records": evidence,
        "fedavg_accuracy": fedavg_accuracy,
        "centralized_accuracy": central_accuracy,
        "accuracy_gap_points": round(100 * (central_accuracy - fedavg_accuracy), 2),
        "plain_fedavg_accuracy": plain_accuracy,
        "plain_fedavg_plan": plan_section(ROUND_DEFAULTS),
        "points_below_plain_fedavg": round(100 * (plain_accuracy - fedavg_accuracy), 2),
        "bytes_up_per_agent_round": bytes_up,
        "bytes_down_per_agent_round": bytes_down,
        "float32_model_bytes": float32_model,
        "federated_seconds": round(fed_seconds, 1),
        "centralized_seconds": round(central_seconds, 1),
        "plain_fedavg_seconds": round(plain_seconds, 1),
        "total_seconds": round(time.monotonic() - started_all, 1),
        "coordinator_state_dirs": {c.name: str(c.state) for c in clouds},
        "heights": [
            {**dict(zip(HEADERS, row, strict=True)), "aggregate_spread_s": spreads.get(row[0])}
            for row in rows
        ],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print("[result]")
    label = "secure aggregation" if args.aggregation == "secagg" else "plaintext updates"
    if args.dp == "record":
        pooled = ", noise pooled" if setup.pooled else ""
        label += f", record-level DP{pooled} (ε {record_spent} of {args.epsilon})"
    elif args.dp == "site":
        label += f", site-level DP (ε {summary['site_epsilon_spent']} of {args.site_epsilon})"
    print(
        format_table(
            ["training", "test accuracy", "seconds"],
            [
                [
                    f"fedgate, {plural(args.clouds, 'cloud')}, {label} ({args.sites} sites)",
                    fedavg_accuracy,
                    f"{fed_seconds:.1f}",
                ],
                [
                    "plain FedAvg (same sites; no DP, no secure aggregation; default plan)",
                    plain_accuracy,
                    f"{plain_seconds:.1f}",
                ],
                ["centralized (union of sites)", central_accuracy, f"{central_seconds:.1f}"],
            ],
        )
    )
    print(
        f"{tolerance_text(args.clouds)}; {len(rows)} of {args.rounds} heights decided; every "
        f"cloud's final model is {final_digest[:16]}; conflicting votes recorded: {evidence}"
    )
    print(
        f"below plain FedAvg: {summary['points_below_plain_fedavg']} points; below "
        f"centralized: {summary['accuracy_gap_points']} points; bytes per agent per round: "
        f"up {bytes_up}, down {bytes_down} (float32 model: {float32_model}); "
        f"total {summary['total_seconds']} s"
    )
    if args.dp == "record":
        print(
            f"record-level ε booked by the coordinators: {summary['record_epsilon_booked']} "
            f"(the largest of {summary['record_epsilon_reporting_agents']} agents' reports; "
            "fedgate-coordinator privacy)"
        )
        if setup.pooled:
            print(
                "      the noise was pooled in each cloud's secure sum: ε "
                f"{record_spent} holds against the coordinators while secure aggregation "
                "does; if a site's cloud-mates colluded with its coordinator, its own share "
                f"alone would give ε {summary['record_epsilon_own_share_only']} "
                "(docs/privacy.md 3.7)"
            )
        if setup.seed_agents:
            print(
                "      --reproducible seeds every agent (training.seed): its noise can be "
                "regenerated, so this ε measures the noise added and guarantees nothing "
                "(docs/privacy.md §5)"
            )
    print(f"summary: {out / 'summary.json'}")
    print(f"inspect: .venv/bin/fedgate-coordinator --state-dir {clouds[0].state} status")
    return 0


if __name__ == "__main__":
    sys.exit(main())
