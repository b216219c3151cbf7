"""What the agent keeps in its state directory besides the key and data.

``status.json``  counters and progress, rewritten atomically (read by ``fedgate-agent status``)
``models/``      the signed global-model messages as received (re-verified when loaded)
``peers.json``   identity keys of the other agents, pinned when first seen in a key roster
``models/current.onnx``  ONNX export of the current model, for scoring (fedgate_agent.onnx_export)
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
from fedgate_common.atomic_files import atomic_write

from fedgate_agent.errors import AgentError

STATUS_FILE = "status.json"
MODELS_DIR = "models"
#: The lock ``run`` holds on the state directory (fedgate_common.instance_lock); commands
#: that must not run beside it take it too, or look at it.
RUN_LOCK = "fedgate-agent"
CURRENT_MODEL = "current.fgm"
KEEP_MODELS = 5
PEERS_FILE = "peers.json"


class SourceStatus(msgspec.Struct, kw_only=True):
    """One live source (an MQTT connection or an OPC-UA server) as ``status`` shows it."""

    name: str
    kind: str  # mqtt | opcua
    connected: bool = False
    received: int = 0
    rate_per_s: float = 0.0  # received per second since the previous snapshot
    stored: int = 0
    duplicates: int = 0
    rejected: dict[str, int] = msgspec.field(default_factory=dict)  # reason → count
    backpressure_waits: int = 0
    queue_depth: int = 0
    reconnects: int = 0
    last_error: str | None = None


class BufferStatus(msgspec.Struct, kw_only=True):
    """The ingest buffer: size, cap and its counters (inserted, duplicates, rejected_full…)."""

    path: str = ""
    samples: int = 0
    max_samples: int = 0
    policy: str = ""
    size_bytes: int = 0
    counters: dict[str, int] = msgspec.field(default_factory=dict)
    quarantined: list[str] = msgspec.field(default_factory=list)
    newest_ts: float | None = None
    error: str | None = None  # the buffer could not be read at the last refresh


class IngestStatus(msgspec.Struct, kw_only=True):
    """The data path: the buffer, every live source, and the lag of the newest sample."""

    buffer: BufferStatus = msgspec.field(default_factory=BufferStatus)
    sources: list[SourceStatus] = msgspec.field(default_factory=list)
    lag_s: float | None = None  # now − timestamp of the newest stored sample


class ScoringStatus(msgspec.Struct, kw_only=True):
    """Live scoring: the exported model in use and what it has done since the agent started."""

    state: str = "waiting for a model"  # waiting for a model | exporting | scoring | off
    live: bool = False  # whether buffer windows are scored (needs a data path)
    model_digest: str | None = None  # of the model scoring now
    model_round: int | None = None
    onnx_opset: int | None = None
    parity_max_abs_diff: float | None = None  # |onnxruntime − torch| at export
    parity_tolerance: float | None = None
    export_seconds: float | None = None
    exports: int = 0
    swaps: int = 0
    windows_scored: int = 0
    windows_incomplete: int = 0  # grid points whose window missed a feature (source down)
    last_window_end: float | None = None
    last_prediction: dict[str, object] | None = None  # class, probability, anomaly_score
    alerts_raised: int = 0
    alert_active: bool = False
    not_published: int = 0  # predictions dropped while the broker was unreachable
    errors: dict[str, int] = msgspec.field(default_factory=dict)  # kind → count
    last_error: str | None = None


class AgentStatus(msgspec.Struct, kw_only=True):
    agent_id: str = ""
    state: str = "stopped"  # stopped | connecting | idle | training
    pid: int | None = None
    updated_at: float = 0.0
    last_answered_round: int = 0
    model_round: int | None = None
    model_digest: str | None = None
    rounds_trained: int = 0
    last_train_loss: float | None = None
    last_num_samples: int | None = None
    bytes_up: int = 0
    bytes_down: int = 0
    rejected: dict[str, int] = msgspec.field(default_factory=dict)
    last_error: str | None = None
    privacy: str = "off"  # off | on | budget exhausted
    privacy_epsilon: float | None = None  # record-level ε spent so far, at privacy_delta
    privacy_budget: float | None = None
    privacy_delta: float | None = None
    # Site level, as this agent counts it: none (no noisy round yet) | on | budget exhausted
    site_privacy: str = "none"
    site_privacy_epsilon: float | None = None  # at privacy_delta
    site_privacy_budget: float | None = None
    # Rounds in privacy.json when it was last written, per level: a ledger with fewer was
    # rolled back, whatever δ or accountant its totals were counted with.
    privacy_rounds: int | None = None
    site_privacy_rounds: int | None = None
    ingest: IngestStatus | None = None  # None: no buffer configured
    scoring: ScoringStatus = msgspec.field(default_factory=ScoringStatus)


class StatusUnreadable(AgentError):
    """``status.json`` exists but the file system will not let it be read."""

    kind = "status_unreadable"


def read_status(state_dir: Path) -> AgentStatus:
    path = state_dir / STATUS_FILE
    try:
        return msgspec.json.decode(path.read_bytes(), type=AgentStatus)
    except FileNotFoundError:
        return AgentStatus()
    except OSError as exc:  # a damaged file is rewritten (below); one we may not read is not
        raise StatusUnreadable(
            f"{path} cannot be read ({exc.strerror or exc}): run this as the agent's service "
            "user, or fix the file's owner and mode"
        ) from None
    except (msgspec.DecodeError, ValueError):  # ValueError: invalid UTF-8
        return AgentStatus(last_error=f"{path} is unreadable; it will be rewritten")


def write_status(state_dir: Path, status: AgentStatus) -> None:
    status.updated_at = time.time()
    atomic_write(state_dir / STATUS_FILE, msgspec.json.encode(status), mode=0o640)


def save_model_message(state_dir: Path, round: int, digest: str, raw: bytes) -> Path:
    """Keep the signed model message; ``current.fgm`` always names the newest."""
    directory = state_dir / MODELS_DIR
    path = directory / f"{round:06d}-{digest[:16]}.fgm"
    atomic_write(path, raw, mode=0o640)
    atomic_write(directory / CURRENT_MODEL, raw, mode=0o640)
    for old in sorted(directory.glob("[0-9]*.fgm"))[:-KEEP_MODELS]:
        old.unlink(missing_ok=True)
    return path


def stored_model_messages(state_dir: Path) -> Iterator[tuple[str, bytes]]:
    """The kept model messages, newest first: the numbered copies by round (each is written
    before ``current.fgm``, so the newest is never older than it), then ``current.fgm``;
    ``(file name, bytes)``, each read when it is asked for, unreadable files left out."""
    directory = state_dir / MODELS_DIR
    names = [*sorted((p.name for p in directory.glob("[0-9]*.fgm")), reverse=True), CURRENT_MODEL]
    for name in names:
        try:
            raw = (directory / name).read_bytes()
        except OSError:  # missing (no model yet) or unreadable: the next copy may do
            continue
        yield name, raw


class PeersUnreadable(AgentError):
    """``peers.json`` exists but cannot be read: refusing to forget pinned keys silently."""


def read_pinned_peers(state_dir: Path) -> dict[str, bytes]:
    """Agent id → Ed25519 identity key seen in earlier rosters (trust on first use)."""
    path = state_dir / PEERS_FILE
    try:
        data = msgspec.json.decode(path.read_bytes(), type=dict[str, str])
        return {agent: bytes.fromhex(key) for agent, key in data.items()}
    except FileNotFoundError:
        return {}
    except (msgspec.DecodeError, ValueError) as exc:
        raise PeersUnreadable(
            f"{path} is unreadable ({exc}); restore it from a backup, or delete it to pin "
            "peers afresh from the next key roster"
        ) from None


def write_pinned_peers(state_dir: Path, peers: dict[str, bytes]) -> None:
    data = {agent: key.hex() for agent, key in sorted(peers.items())}
    atomic_write(state_dir / PEERS_FILE, msgspec.json.encode(data), mode=0o640)
