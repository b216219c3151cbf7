"""Agent configuration: TOML file, then ``FEDGATE_*`` environment overrides, then validation.

Everything here runs before any network IO, and every problem is reported at once with the
key, the bad value and what is allowed, so an operator can fix the file in one pass.

Order of precedence (last wins): built-in defaults → TOML file → environment.

Environment overrides are named ``FEDGATE_`` + the dotted key upper-cased with ``.`` → ``_``
(``broker.port`` → ``FEDGATE_BROKER_PORT``). Values are parsed to the key's type; a value
that does not parse is an error naming the variable. Other ``FEDGATE_*`` variables are
ignored (other fedgate programs share the prefix); one that looks like a misspelt config key
(``FEDGATE_BROKR_PORT``) is logged as a warning with the likely intended name.

Paths: ``state_dir`` must be absolute (systemd services run with ``/`` as working
directory). ``training.data_file`` empty means ``<state_dir>/data/train.npz``; a relative
``data_file`` is taken relative to ``state_dir``.

TOML has no null, so ``training.seed = ""`` stands for "no seed" (``None``).

Writing (:func:`write_config`, :func:`set_config_value`) replaces the file atomically
(temporary file in the same directory, fsync, rename) and writes every key, defaults
included; comments in a hand-edited file are not preserved.
"""

from __future__ import annotations

import difflib
import logging
import math
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import msgspec
import tomli_w
from fedgate_common.atomic_files import atomic_write, file_in_the_way
from fedgate_common.errors import InvalidIdentifier
from fedgate_common.hosts import host_problem, url_host_problem
from fedgate_common.identifiers import validate_identifier
from fedgate_common.keys import InvalidKey, parse_public_key
from fedgate_common.service_units import SettingPath, load_credentials_into
from fedgate_common.topics import FEDERATION

from fedgate_agent.errors import ConfigError
from fedgate_agent.ingest.samples import tag_problem
from fedgate_agent.record_privacy import ACCOUNTANTS, DEFAULT_ACCOUNTANT, RECORD_NOISE_MODES
from fedgate_agent.site_privacy import DEFAULT_SITE_MAX_EPSILON

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "ENV_PREFIX",
    "AgentConfig",
    "BrokerConfig",
    "ScoringConfig",
    "TrainingConfig",
    "config_as_dict",
    "config_keys",
    "credential_names",
    "env_variable_name",
    "load_config",
    "set_config_value",
    "set_config_values",
    "validate_config",
    "write_config",
]

logger = logging.getLogger(__name__)

DEFAULT_CONFIG_PATH = Path("/etc/fedgate/agent.toml")
ENV_PREFIX = "FEDGATE_"

#: Mode of a newly created config file: owner read/write, group (the service) read.

LOG_LEVELS: Final = ("debug", "info", "warning", "error")
BROKER_PROTOCOLS: Final = ("auto", "5", "3.1.1")
PORT_RANGE: Final = (1, 65535)
KEEPALIVE_RANGE: Final = (1, 65535)
QUEUE_SIZE_RANGE: Final = (1, 10000)
THREADS_RANGE: Final = (1, 64)
SEED_RANGE: Final = (0, 2**63 - 1)
MIN_THRESHOLD_RANGE: Final = (2, 10_000)
COLLUDERS_RANGE: Final = (0, 10_000)
PLAINTEXT_POLICIES: Final = ("refuse", "allow")


class BrokerConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The MQTT broker of this agent's cloud."""

    host: str = "127.0.0.1"
    port: int = 1883
    protocol: str = "auto"  # "auto" (MQTT 5, falling back to 3.1.1) | "5" | "3.1.1"
    keepalive_s: int = 30
    queue_size: int = 64  # bounded inbound message queue
    username: str = ""  # "" = anonymous (a locked-down broker wants the agent id)
    password_file: str = ""  # first line is the password (systemd LoadCredential)
    tls_ca_file: str = ""  # "" = plain TCP; else TLS, the broker verified against this CA
    tls_cert_file: str = ""  # client certificate (with tls_key_file), when the broker asks
    tls_key_file: str = ""


class TrainingConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Local training on the gateway."""

    source: str = "file"  # "file": the .npz at data_file | "buffer": windows over ingested data
    data_file: str = ""  # "" → <state_dir>/data/train.npz; relative → under state_dir
    threads: int = 1  # torch intra-op threads
    seed: int | None = None  # tests only; None → fresh randomness


class SecAggConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What this agent accepts from its coordinator for secure aggregation."""

    # refuse rounds whose Shamir threshold t is lower; 0: the default graph's t for the
    # round's selected agents (a coordinator may raise it, never lower it)
    min_threshold: int = 0
    # Colluding agents to resist: raises the confirmation quorum, and their site-level noise
    # shares are not counted on (privacy.md §7.8).
    assumed_colluders: int = 0
    plaintext_rounds: str = "refuse"  # "refuse" | "allow": rounds without secure aggregation


class PrivacyConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Record-level differential privacy of local training (DP-SGD)."""

    record_level: str = "off"  # "on" | "off"
    # "local": each DP-SGD step adds the whole noise here; "pooled": one clipped step a
    # round, the noise the secure sum's shares (privacy.md section 3.7)
    record_noise: str = "local"
    target_epsilon: float = 3.0  # over planned_rounds rounds, at delta
    delta: float = 1e-5
    max_grad_norm: float = 4.0  # per-window gradient clipping norm
    planned_rounds: int = 20  # rounds the budget is spread over; the agent stops after it
    accountant: str = DEFAULT_ACCOUNTANT  # a key of ACCOUNTANTS: how ε is counted (privacy.md §4)
    # "on": send ε (round and total), δ, σ and C with each update, for the coordinator's
    # privacy ledger; "off" keeps them on the gateway (docs/privacy.md section 4).
    report_epsilon: str = "on"
    # Site level: refuse secure rounds whose distributed noise multiplier is below this.
    site_min_noise_multiplier: float = 0.0
    # Site level: this agent's own budget for the noisy rounds it sends masked inputs to,
    # counted at delta by its accountant; rounds past it are refused (privacy.md §7.8).
    site_max_epsilon: float = DEFAULT_SITE_MAX_EPSILON


class IngestConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The durable buffer that live sources and historian imports write into."""

    buffer_file: str = ""  # "" → <state_dir>/ingest/buffer.db; relative → under state_dir
    max_samples: int = 5_000_000  # cap on stored samples
    cap_policy: str = "reject_new"  # "reject_new" | "drop_oldest" at the cap
    mqtt_host: str = ""  # plant-data broker; "" → broker.host
    mqtt_port: int = 0  # 0 → broker.port
    mqtt_username: str = ""  # login at the plant-data broker ("" = anonymous)
    mqtt_password_file: str = ""  # file holding its password (systemd LoadCredential)
    mqtt_tls_ca_file: str = ""  # "" = plain TCP; else TLS against this CA
    mqtt_tls_cert_file: str = ""  # client certificate (with mqtt_tls_key_file)
    mqtt_tls_key_file: str = ""
    batch_max: int = 2000  # messages per group commit
    queue_max: int = 20000  # decoded-but-uncommitted messages before backpressure
    max_payload_bytes: int = 65536  # larger payloads are rejected and counted


class WindowsConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Training windows over the buffer (used when ``training.source = "buffer"``)."""

    tags: tuple[str, ...] = ()  # feature tags, in the model's input order
    period_s: float = 180.0  # resampling grid step
    length: int = 0  # samples per window; 0 → the model's window
    stride: int = 1
    max_gap_s: float = 0.0  # forward-fill limit; 0 → 2 × period_s
    label_mode: str = "tag"  # "tag": class from label_tag | "next_value": bin of label_tag later
    label_tag: str = "FAULT"
    label_bins: tuple[float, ...] = ()  # next_value: sorted bin edges (len + 1 classes)
    horizon: int = 1  # next_value: grid steps after the window's end
    uniform_labels: str = "on"  # "on": drop windows whose label changes inside them
    test_fraction: float = 0.0  # the latest part of the time range, held out (`windows`)


class MqttSourceConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One ``[[mqtt_source]]``: a topic filter ingested into the buffer (QoS 1)."""

    topic: str
    format: str = "json"  # "json" ({"ts", "value", "seq"}) | "sparkplug" (Sparkplug B)
    tag: str = ""  # fixed tag for every message, or "" to take it from a topic level
    tag_level: int = -1  # topic level naming the tag (0-based; negative counts from the end)


class OpcUaSourceConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One ``[[opcua_source]]``: an OPC-UA server whose nodes are subscribed to."""

    endpoint: str  # opc.tcp://host:port[/path]
    tags: dict[str, str]  # tag → node id ("ns=2;s=XMEAS_1")
    name: str = ""  # names its systemd credential (opcua-<name>-password); "" → by position
    sampling_interval_ms: float = 0.0  # 0 → the server's fastest
    username: str = ""
    password_file: str = ""


class ScoringConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Live scoring of buffer windows with the ONNX export of the certified global model."""

    enabled: str = "auto"  # "auto": "on" when a data path exists, else "off" | "on" | "off"
    topic: str = ""  # "" → fedgate/<deployment>/<cloud>/site/<agent_id>/predictions
    alert_topic: str = ""  # "" → fedgate/<deployment>/<cloud>/site/<agent_id>/alerts
    alert_threshold: float = 0.9  # anomaly score (1 − P(normal)) that raises an alert; 0 = off
    alert_classes: tuple[str, ...] = ()  # predicted class indices that raise an alert
    alert_raise_after: int = 1  # consecutive alerting windows before "raised"
    alert_clear_after: int = 3  # consecutive quiet windows before "cleared" (no flapping)
    normal_class: int = 0  # class meaning "no fault"; -1: no anomaly score
    interval_s: float = 0.0  # how often to look for a new window; 0 → windows.period_s
    settle_s: float = 1.0  # wait after a grid point before scoring its window (late samples)


class AgentConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Complete agent configuration (one TOML file)."""

    agent_id: str
    deployment: str
    cloud: str
    state_dir: str = "/var/lib/fedgate-agent"
    coordinator_public_key: str = ""  # "ed25519:<64 hex>"; empty only before enrollment
    # SHA-256 of the pinned federation manifest (`fedgate-agent federation pin FILE`).
    manifest_digest: str = ""
    log_level: str = "info"
    broker: BrokerConfig = msgspec.field(default_factory=BrokerConfig)
    training: TrainingConfig = msgspec.field(default_factory=TrainingConfig)
    secagg: SecAggConfig = msgspec.field(default_factory=SecAggConfig)
    privacy: PrivacyConfig = msgspec.field(default_factory=PrivacyConfig)
    ingest: IngestConfig = msgspec.field(default_factory=IngestConfig)
    windows: WindowsConfig = msgspec.field(default_factory=WindowsConfig)
    scoring: ScoringConfig = msgspec.field(default_factory=ScoringConfig)
    mqtt_source: tuple[MqttSourceConfig, ...] = ()
    opcua_source: tuple[OpcUaSourceConfig, ...] = ()

    @property
    def state_path(self) -> Path:
        """Directory holding the identity key, models and data."""
        return Path(self.state_dir)

    @property
    def data_path(self) -> Path:
        """Training data file (``.npz``)."""
        if not self.training.data_file:
            return self.state_path / "data" / "train.npz"
        return self.state_path / self.training.data_file  # absolute data_file wins

    @property
    def buffer_path(self) -> Path:
        """The ingest buffer (SQLite)."""
        if not self.ingest.buffer_file:
            return self.state_path / "ingest" / "buffer.db"
        return self.state_path / self.ingest.buffer_file  # absolute buffer_file wins

    @property
    def reproducible_noise(self) -> bool:
        """Record-level DP with ``training.seed`` set: its batches and noise repeat from the
        seed, so they protect nothing (privacy.md §5)."""
        return self.privacy.record_level == "on" and self.training.seed is not None


def _config_error(message: str, problems: list[str] | None = None) -> ConfigError:
    """A :class:`ConfigError` listing every problem found, one message each."""
    return ConfigError(message, problems=problems)


# --------------------------------------------------------------------------- schema


class _Key(msgspec.Struct, frozen=True):
    """One dotted key of the schema."""

    dotted: str
    kind: str  # "str" | "int" | "optional_int" | "float"
    required: bool
    allowed: str  # human description of valid values, used in messages


_SECTIONS: Final[dict[str, type[msgspec.Struct]]] = {
    "broker": BrokerConfig,
    "training": TrainingConfig,
    "secagg": SecAggConfig,
    "privacy": PrivacyConfig,
    "ingest": IngestConfig,
    "windows": WindowsConfig,
    "scoring": ScoringConfig,
}

#: Arrays of tables (``[[mqtt_source]]``): edited in the file, not by key or environment.
_LISTS: Final[dict[str, type[msgspec.Struct]]] = {
    "mqtt_source": MqttSourceConfig,
    "opcua_source": OpcUaSourceConfig,
}

_ALLOWED: Final[dict[str, str]] = {
    "agent_id": "1-64 characters from A-Z a-z 0-9 _ . - starting with a letter or digit",
    "deployment": "1-64 characters from A-Z a-z 0-9 _ . - starting with a letter or digit",
    "cloud": "1-64 characters from A-Z a-z 0-9 _ . - starting with a letter or digit",
    "state_dir": "an absolute directory path",
    "coordinator_public_key": 'the coordinator key as "ed25519:<64 hex digits>"',
    "manifest_digest": (
        "the 64-hex-digit digest of the pinned federation manifest; set by "
        "`fedgate-agent federation pin FILE`"
    ),
    "log_level": " | ".join(LOG_LEVELS),
    "broker.host": "a host name or IP address, without scheme or port",
    "broker.port": f"an integer {PORT_RANGE[0]}..{PORT_RANGE[1]}",
    "broker.protocol": '"auto" (MQTT 5, falling back to 3.1.1) | "5" | "3.1.1"',
    "broker.keepalive_s": f"an integer {KEEPALIVE_RANGE[0]}..{KEEPALIVE_RANGE[1]} (seconds)",
    "broker.queue_size": f"an integer {QUEUE_SIZE_RANGE[0]}..{QUEUE_SIZE_RANGE[1]}",
    "broker.username": 'the MQTT user name (the agent id at a locked-down broker); "" for none',
    "broker.password_file": 'a file holding that user\'s password; "" for none',
    "broker.tls_ca_file": 'the CA file that signed the broker\'s certificate; "" for plain TCP',
    "broker.tls_cert_file": 'a client certificate file (with broker.tls_key_file); "" for none',
    "broker.tls_key_file": 'the client certificate\'s private key file; "" for none',
    "training.source": '"file" (the .npz at data_file) | "buffer" (windows over ingested data)',
    "training.data_file": 'a path (absolute, or relative to state_dir); "" for the default',
    "training.threads": f"an integer {THREADS_RANGE[0]}..{THREADS_RANGE[1]}",
    "training.seed": f'an integer {SEED_RANGE[0]}..{SEED_RANGE[1]}, or "" for random',
    "secagg.min_threshold": (
        f"0, or an integer {MIN_THRESHOLD_RANGE[0]}..{MIN_THRESHOLD_RANGE[1]}: the lowest "
        "Shamir threshold this agent accepts (0: the default graph's for the round)"
    ),
    "secagg.assumed_colluders": (
        f"an integer {COLLUDERS_RANGE[0]}..{COLLUDERS_RANGE[1]}: colluding agents to resist; "
        "the agent then needs floor((roster + this) / 2) + 1 signatures on the survivor set"
    ),
    "secagg.plaintext_rounds": '"refuse" (default) | "allow": rounds without secure aggregation',
    "privacy.record_level": '"on" | "off" (default): DP-SGD for local training',
    "privacy.record_noise": (
        '"local" (default: every DP-SGD step noised on this gateway) | "pooled" (one clipped '
        "step a round, noised by the secure sum's shares; privacy.md section 3.7)"
    ),
    "privacy.report_epsilon": '"on" (default) | "off": send record-level ε to the coordinator',
    "privacy.target_epsilon": "a number in (0, 100]: the record-level ε budget at delta",
    "privacy.delta": "a number in (0, 0.01]: the δ of the budget (below 1 / windows)",
    "privacy.max_grad_norm": "a number in (0, 1000]: per-window gradient clipping norm",
    "privacy.planned_rounds": "an integer 1..100000: rounds the budget is spread over",
    "privacy.accountant": (
        '"pld" (default, the tighter bound) | "rdp": the accountant that counts record-level ε'
    ),
    "privacy.site_min_noise_multiplier": (
        "a number in [0, 1000]: refuse secure rounds with less site-level noise (0 = accept any)"
    ),
    "privacy.site_max_epsilon": (
        "a number in (0, 100]: this agent's own site-level ε budget at delta (default 10)"
    ),
    "ingest.buffer_file": 'a path (absolute, or relative to state_dir); "" for the default',
    "ingest.max_samples": "an integer 1000..10^10: samples the buffer holds at most",
    "ingest.cap_policy": '"reject_new" | "drop_oldest": what happens at max_samples',
    "ingest.mqtt_host": 'the plant-data broker\'s host; "" for broker.host',
    "ingest.mqtt_port": "an integer 0..65535; 0 for broker.port",
    "ingest.mqtt_username": 'a user name at the plant-data broker; "" for anonymous',
    "ingest.mqtt_password_file": 'a file holding that user\'s password; "" for none',
    "ingest.mqtt_tls_ca_file": 'the plant-data broker\'s CA file; "" for plain TCP',
    "ingest.mqtt_tls_cert_file": 'a client certificate file for the plant-data broker; "" for none',
    "ingest.mqtt_tls_key_file": 'its private key file; "" for none',
    "ingest.batch_max": "an integer 1..100000: messages per group commit",
    "ingest.queue_max": "an integer 1..1000000: uncommitted messages before backpressure",
    "ingest.max_payload_bytes": "an integer 64..16777216",
    "windows.tags": "a list of tag names (comma-separated in the environment), in input order",
    "windows.period_s": "a number in (0, 86400]: resampling step in seconds",
    "windows.length": "an integer 0..100000; 0 for the model's window",
    "windows.stride": "an integer 1..100000",
    "windows.max_gap_s": "a number in [0, 10^7]; 0 for 2 × period_s",
    "windows.label_mode": '"tag" | "next_value"',
    "windows.label_tag": "a tag name",
    "windows.label_bins": "a sorted list of numbers (next_value bin edges)",
    "windows.horizon": "an integer 1..100000",
    "windows.uniform_labels": '"on" | "off"',
    "windows.test_fraction": "a number in [0, 0.9]",
    "scoring.enabled": (
        '"auto" (on when a data path exists) | "on" (export every model; score live '
        'windows when there is a data path) | "off"'
    ),
    "scoring.topic": 'an MQTT topic without wildcards; "" for the default predictions topic',
    "scoring.alert_topic": 'an MQTT topic without wildcards; "" for the default alerts topic',
    "scoring.alert_threshold": "a number in [0, 1]: anomaly score raising an alert; 0 = none",
    "scoring.alert_classes": "a list of class indices (comma-separated in the environment)",
    "scoring.alert_raise_after": "an integer 1..10000: alerting windows in a row to raise",
    "scoring.alert_clear_after": "an integer 1..10000: quiet windows in a row to clear",
    "scoring.normal_class": "an integer -1..100000: the no-fault class; -1 = no anomaly score",
    "scoring.interval_s": "a number in [0, 86400]; 0 for windows.period_s",
    "scoring.settle_s": "a number in [0, 3600]: delay before a grid point's window is scored",
}


def _kind_of(annotation: object) -> str:
    if annotation is str:
        return "str"
    if annotation is int:
        return "int"
    if annotation == (int | None):
        return "optional_int"
    if annotation is float:
        return "float"
    if annotation == tuple[str, ...]:
        return "str_list"
    if annotation == tuple[float, ...]:
        return "float_list"
    raise TypeError(f"unsupported config field type {annotation!r}")  # pragma: no cover


def _build_schema() -> dict[str, _Key]:
    schema: dict[str, _Key] = {}
    for field in msgspec.structs.fields(AgentConfig):
        if field.name in _SECTIONS:
            for sub in msgspec.structs.fields(_SECTIONS[field.name]):
                dotted = f"{field.name}.{sub.name}"
                schema[dotted] = _Key(dotted, _kind_of(sub.type), sub.required, _ALLOWED[dotted])
        elif field.name in _LISTS:
            continue
        else:
            schema[field.name] = _Key(
                field.name, _kind_of(field.type), field.required, _ALLOWED[field.name]
            )
    return schema


_SCHEMA: Final = _build_schema()


def config_keys() -> list[str]:
    """Every dotted key in file order: ``agent_id``, …, ``broker.port``, …"""
    return list(_SCHEMA)


def env_variable_name(key: str) -> str:
    """``broker.port`` → ``FEDGATE_BROKER_PORT``."""
    return ENV_PREFIX + key.upper().replace(".", "_")


_ENV_TO_KEY: Final = {env_variable_name(key): key for key in _SCHEMA}


def _unknown_key_problem(dotted: str, where: str) -> str:
    close = difflib.get_close_matches(dotted, list(_SCHEMA) + list(_SECTIONS), n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown key {dotted!r} in {where}{hint} (valid keys: {', '.join(_SCHEMA)})"


# --------------------------------------------------------------------------- parsing


def _describe(value: object) -> str:
    names = {bool: "boolean", int: "integer", float: "float", str: "string", dict: "table"}
    return f"{names.get(type(value), type(value).__name__)} {value!r}"


def _parse_text(key: str, text: str, *, source: str) -> object:
    """Parse a string from the environment or the CLI into the key's TOML value."""
    spec = _SCHEMA[key]
    if spec.kind == "str":
        return text
    if spec.kind in ("str_list", "float_list"):
        items = [item.strip() for item in text.split(",") if item.strip()]
        if spec.kind == "str_list":
            return items
        try:
            numbers = [float(item) for item in items]
        except ValueError:
            numbers = [math.nan]
        if not all(math.isfinite(n) for n in numbers):
            raise _config_error(
                f"{source}={text!r} is not a comma-separated list of finite numbers; "
                f"{key} must be {spec.allowed}"
            )
        return numbers
    stripped = text.strip()
    if spec.kind == "optional_int" and stripped == "":
        return ""
    if spec.kind == "float":
        try:
            value = float(stripped)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise _config_error(
                f"{source}={text!r} is not a finite number; {key} must be {spec.allowed}"
            )
        return value
    try:
        return int(stripped, 10)
    except ValueError:
        raise _config_error(
            f"{source}={text!r} is not an integer; {key} must be {spec.allowed}"
        ) from None


def _type_problem(key: str, value: object) -> str | None:
    spec = _SCHEMA[key]
    if spec.kind == "str":
        ok = isinstance(value, str)
    elif spec.kind == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif spec.kind == "float":
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    elif spec.kind == "str_list":
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    elif spec.kind == "float_list":
        ok = isinstance(value, list) and all(
            isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
            for v in value
        )
    else:
        ok = value == "" or (isinstance(value, int) and not isinstance(value, bool))
    if ok:
        return None
    return f"{key} = {_describe(value)} has the wrong type; use {spec.allowed}"


def _shape_problems(raw: Mapping[str, Any], where: str) -> list[str]:
    """Unknown keys, non-table sections, missing required keys, wrong value types."""
    problems: list[str] = []
    for name, value in raw.items():
        if name in _SECTIONS:
            if not isinstance(value, dict):
                problems.append(f"{name} must be a table ([{name}]), got {_describe(value)}")
                continue
            for sub, sub_value in value.items():
                dotted = f"{name}.{sub}"
                if dotted not in _SCHEMA:
                    problems.append(_unknown_key_problem(dotted, where))
                elif (problem := _type_problem(dotted, sub_value)) is not None:
                    problems.append(problem)
        elif name in _LISTS:
            problems.extend(_list_problems(name, value))
        elif name not in _SCHEMA:
            problems.append(_unknown_key_problem(name, where))
        elif (problem := _type_problem(name, value)) is not None:
            problems.append(problem)
    for key, spec in _SCHEMA.items():
        if spec.required and "." not in key and key not in raw:
            problems.append(f"missing required key {key!r} in {where}; set it to {spec.allowed}")
    return problems


def _list_problems(name: str, value: object) -> list[str]:
    """Problems of one array of tables (``[[mqtt_source]]``), each entry converted strictly."""
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        return [f"{name} must be an array of tables ([[{name}]]), got {_describe(value)}"]
    problems: list[str] = []
    for index, entry in enumerate(value, start=1):
        try:
            msgspec.convert(entry, _LISTS[name], strict=True)
        except msgspec.ValidationError as exc:
            problems.append(f"[[{name}]] number {index}: {exc}")
    return problems


def _set_raw(raw: dict[str, Any], key: str, value: object) -> None:
    section, _, name = key.rpartition(".")
    if not section:
        raw[key] = value
        return
    table = raw.setdefault(section, {})
    if isinstance(table, dict):  # a non-table section is reported by _shape_problems
        table[name] = value


def _from_raw(raw: Mapping[str, Any]) -> AgentConfig:
    """Convert a shape-checked TOML dict; ``training.seed = ""`` becomes ``None``."""
    data = {name: dict(value) if name in _SECTIONS else value for name, value in raw.items()}
    for name in _LISTS:
        if name in data:
            data[name] = tuple(data[name])
    training = data.get("training")
    if isinstance(training, dict) and training.get("seed") == "":
        training["seed"] = None
    try:
        return msgspec.convert(data, AgentConfig, strict=True)
    except msgspec.ValidationError as exc:  # pragma: no cover - _shape_problems catches these
        raise _config_error(f"invalid configuration: {exc}") from None


def _read_raw(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        message = (
            f"config file {path} does not exist; run `fedgate-agent init` to create it "
            "or pass --config PATH"
        )
        raise _config_error(message) from None
    except (OSError, UnicodeDecodeError) as exc:
        message = f"cannot read config file {path}: {exc}"
        raise _config_error(message) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        message = f"config file {path} is not valid TOML: {exc}"
        raise _config_error(message) from None


def _raise_problems(problems: list[str], where: str) -> None:
    if problems:
        listing = "\n".join(f"  - {problem}" for problem in problems)
        raise _config_error(f"invalid configuration in {where}:\n{listing}", problems)


def _env_overrides(env: Mapping[str, str]) -> dict[str, tuple[str, object]]:
    """``{dotted key: (variable name, parsed value)}``; warns about likely misspellings."""
    overrides: dict[str, tuple[str, object]] = {}
    for name in sorted(env):
        if not name.startswith(ENV_PREFIX):
            continue
        key = _ENV_TO_KEY.get(name)
        if key is not None:
            overrides[key] = (name, _parse_text(key, env[name], source=name))
            continue
        close = difflib.get_close_matches(name, list(_ENV_TO_KEY), n=1, cutoff=0.85)
        if close:
            logger.warning(
                "ignoring environment variable %s: not a config key; did you mean %s?",
                name,
                close[0],
                extra={"fields": {"variable": name, "suggestion": close[0]}},
            )
    return overrides


# --------------------------------------------------------------------------- public API


def load_config(
    path: Path,
    env: Mapping[str, str] | None = None,
    *,
    require_complete: bool = True,
) -> AgentConfig:
    """Read ``path``, apply ``FEDGATE_*`` overrides from ``env`` (default ``os.environ``),
    validate, and return the configuration.

    ``require_complete=False`` accepts an empty ``coordinator_public_key`` (before
    enrollment). Raises :class:`ConfigError` listing every problem found.
    """
    raw = _read_raw(path)
    where = str(path)
    environ = os.environ if env is None else env
    overrides = _env_overrides(environ)
    for key, (_, value) in overrides.items():
        _set_raw(raw, key, value)
    # Under systemd, secret files come from $CREDENTIALS_DIRECTORY (LoadCredential).
    load_credentials_into(raw, credential_names(raw), environ, exists=os.path.isfile)
    _raise_problems(_shape_problems(raw, where), where)
    config = _from_raw(raw)
    sources = {key: variable for key, (variable, _) in overrides.items()}
    problems = [
        f"{message} (set by {sources[key]})" if key in sources else message
        for key, message in _key_problems(config, require_complete=require_complete)
    ]
    _raise_problems(problems, where)
    return config


def credential_names(raw: Mapping[str, Any]) -> dict[SettingPath, str]:
    """Secret-file settings of a raw agent.toml and their systemd credential names
    (``fedgate-agent install-service`` writes the matching ``LoadCredential=``).

    An ``[[opcua_source]]`` with a ``name`` has ``opcua-<name>-password``, which follows it
    when sources are inserted, removed or reordered; one without is numbered by position
    (``opcua-<n>-password``, n from 1).
    """
    names: dict[SettingPath, str] = {
        ("broker", "password_file"): "broker-password",
        ("broker", "tls_key_file"): "broker-tls-key",
        ("ingest", "mqtt_password_file"): "mqtt-password",
        ("ingest", "mqtt_tls_key_file"): "mqtt-tls-key",
    }
    sources = raw.get("opcua_source", [])
    for index, source in enumerate(sources if isinstance(sources, list) else []):
        names[("opcua_source", index, "password_file")] = _opcua_credential_name(
            source.get("name", "") if isinstance(source, dict) else "", index
        )
    return names


def _opcua_credential_name(name: object, index: int) -> str:
    """The credential of the ``index``-th (from 0) source's password: by ``name`` when it is
    an identifier, else by position (an invalid name is reported by validation)."""
    if isinstance(name, str) and name:
        try:
            return f"opcua-{validate_identifier(name)}-password"
        except InvalidIdentifier:
            pass
    return f"opcua-{index + 1}-password"


def _check_range(key: str, value: int, bounds: tuple[int, int]) -> tuple[str, str] | None:
    low, high = bounds
    if low <= value <= high:
        return None
    return key, f"{key} = {value} is out of range; use {_SCHEMA[key].allowed}"


def _key_problems(config: AgentConfig, *, require_complete: bool) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    for key in ("agent_id", "deployment", "cloud"):
        try:
            validate_identifier(getattr(config, key), what=key)
        except InvalidIdentifier as exc:
            problems.append((key, str(exc)))

    if config.cloud == FEDERATION:
        problems.append(("cloud", f"cloud = {FEDERATION!r} is reserved for federation topics"))

    if not config.state_dir or not Path(config.state_dir).is_absolute():
        problems.append(
            ("state_dir", f"state_dir = {config.state_dir!r} is not {_ALLOWED['state_dir']}")
        )
    elif (blocker := file_in_the_way(Path(config.state_dir))) is not None:
        problems.append(
            (
                "state_dir",
                f"state_dir = {config.state_dir!r}: {blocker} is not a directory (a file, "
                "or a link to nothing); set state_dir to a directory (a missing one is "
                "created)",
            )
        )

    key_text = config.coordinator_public_key
    if key_text == "":
        if require_complete:
            problems.append(
                (
                    "coordinator_public_key",
                    "coordinator_public_key is empty; set it to the key shown by "
                    '`fedgate-coordinator status` ("ed25519:<64 hex digits>")',
                )
            )
    else:
        try:
            parse_public_key(key_text)
        except InvalidKey as exc:
            problems.append(("coordinator_public_key", f"coordinator_public_key: {exc}"))

    digest = config.manifest_digest
    if digest == "":
        if require_complete:
            problems.append(
                (
                    "manifest_digest",
                    "no federation manifest is pinned; run `fedgate-agent federation pin FILE` "
                    "with the manifest your coordinator's operator gives you",
                )
            )
    elif len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        problems.append(
            ("manifest_digest", f"manifest_digest is not {_ALLOWED['manifest_digest']}")
        )

    if config.log_level not in LOG_LEVELS:
        problems.append(
            ("log_level", f"log_level = {config.log_level!r} is not one of {_ALLOWED['log_level']}")
        )

    broker = config.broker
    host = broker.host
    if (why := host_problem(host)) is not None:
        problems.append(
            ("broker.host", f"broker.host = {host!r} is not {_ALLOWED['broker.host']} ({why})")
        )
    if broker.protocol not in BROKER_PROTOCOLS:
        problems.append(
            (
                "broker.protocol",
                f"broker.protocol = {broker.protocol!r} is not {_ALLOWED['broker.protocol']}",
            )
        )
    ranged = [
        _check_range("broker.port", broker.port, PORT_RANGE),
        _check_range("broker.keepalive_s", broker.keepalive_s, KEEPALIVE_RANGE),
        _check_range("broker.queue_size", broker.queue_size, QUEUE_SIZE_RANGE),
        _check_range("training.threads", config.training.threads, THREADS_RANGE),
        None
        if config.secagg.min_threshold == 0
        else _check_range("secagg.min_threshold", config.secagg.min_threshold, MIN_THRESHOLD_RANGE),
        _check_range("secagg.assumed_colluders", config.secagg.assumed_colluders, COLLUDERS_RANGE),
    ]
    privacy = config.privacy
    for key, switch in (
        ("privacy.record_level", privacy.record_level),
        ("privacy.report_epsilon", privacy.report_epsilon),
    ):
        if switch not in ("on", "off"):
            problems.append((key, f"{key} = {switch!r} is not {_ALLOWED[key]}"))
    if privacy.record_noise not in RECORD_NOISE_MODES:
        key = "privacy.record_noise"
        problems.append((key, f"{key} = {privacy.record_noise!r} is not {_ALLOWED[key]}"))
    elif privacy.record_noise == "pooled" and privacy.record_level == "off":
        key = "privacy.record_noise"
        problems.append(
            (
                key,
                f'{key} = "pooled" with privacy.record_level = "off": this agent would train '
                "without record-level DP and the setting would do nothing; set "
                'privacy.record_level = "on" first, or privacy.record_noise = "local"',
            )
        )
    if privacy.accountant not in ACCOUNTANTS:
        key = "privacy.accountant"
        problems.append((key, f"{key} = {privacy.accountant!r} is not {_ALLOWED[key]}"))
    for key, value, low, high in (
        ("privacy.target_epsilon", privacy.target_epsilon, 0.0, 100.0),
        ("privacy.delta", privacy.delta, 0.0, 0.01),
        ("privacy.max_grad_norm", privacy.max_grad_norm, 0.0, 1000.0),
        ("privacy.site_max_epsilon", privacy.site_max_epsilon, 0.0, 100.0),
    ):
        if not low < value <= high:
            problems.append((key, f"{key} = {value!r} is not {_ALLOWED[key]}"))
    if not 0 <= privacy.site_min_noise_multiplier <= 1000:
        key = "privacy.site_min_noise_multiplier"
        problems.append(
            (key, f"{key} = {privacy.site_min_noise_multiplier!r} is not {_ALLOWED[key]}")
        )
    if not 1 <= privacy.planned_rounds <= 100_000:
        problems.append(
            (
                "privacy.planned_rounds",
                f"privacy.planned_rounds = {privacy.planned_rounds} is not "
                f"{_ALLOWED['privacy.planned_rounds']}",
            )
        )
    if config.secagg.plaintext_rounds not in PLAINTEXT_POLICIES:
        problems.append(
            (
                "secagg.plaintext_rounds",
                f"secagg.plaintext_rounds = {config.secagg.plaintext_rounds!r} is not "
                f"{_ALLOWED['secagg.plaintext_rounds']}",
            )
        )
    problems.extend(_data_path_problems(config))
    problems.extend(_scoring_problems(config))
    if config.training.seed is not None:
        ranged.append(_check_range("training.seed", config.training.seed, SEED_RANGE))
    problems.extend(problem for problem in ranged if problem is not None)
    return problems


#: OPC-UA node ids in their string form: optional namespace, then i=, s=, g= or b=.
_NODE_ID: Final = re.compile(r"(?:ns=\d+;|nsu=[^;]+;)?(?:i=\d+|s=.+|g=[0-9A-Fa-f-]{36}|b=\S+)")


def _node_key(node_id: str) -> tuple[object, ...]:
    """What makes two spellings of a node id the same node: ``i=85``, ``ns=0;i=85`` and
    ``ns=0;i=085`` are one (namespace 0 by default, numbers by value, GUIDs in any case)."""
    namespace = "0"
    rest = node_id
    if node_id.startswith(("ns=", "nsu=")) and ";" in node_id:
        namespace, rest = node_id.split(";", 1)
        namespace = namespace.removeprefix("ns=")
        if namespace.isdigit():
            namespace = str(int(namespace))
    kind, _, value = rest.partition("=")
    if kind == "i" and value.isdigit():
        return (namespace, kind, int(value))
    return (namespace, kind, value.lower() if kind == "g" else value)


def _is_topic_filter(topic: str) -> bool:
    """An MQTT topic filter: '+' and '#' only as whole levels, '#' last, not a $SYS topic."""
    if not topic or topic.startswith("$") or len(topic.encode()) > 65535 or "\0" in topic:
        return False
    levels = topic.split("/")
    for position, level in enumerate(levels):
        if ("+" in level or "#" in level) and level not in ("+", "#"):
            return False
        if level == "#" and position != len(levels) - 1:
            return False
    return True


def _data_path_problems(config: AgentConfig) -> list[tuple[str, str]]:
    """The ingest, windows and source settings."""
    problems: list[tuple[str, str]] = []

    def bad(key: str, value: object) -> None:
        problems.append((key, f"{key} = {value!r} is not {_ALLOWED[key]}"))

    ingest, windows = config.ingest, config.windows
    if config.training.source not in ("file", "buffer"):
        bad("training.source", config.training.source)
    if ingest.cap_policy not in ("reject_new", "drop_oldest"):
        bad("ingest.cap_policy", ingest.cap_policy)
    if ingest.mqtt_host and (why := host_problem(ingest.mqtt_host)) is not None:
        problems.append(
            (
                "ingest.mqtt_host",
                f"ingest.mqtt_host = {ingest.mqtt_host!r} is not a host name or IP address "
                f'({why}); "" for broker.host',
            )
        )
    for key, value, low, high in (
        ("ingest.max_samples", ingest.max_samples, 1000, 10**10),
        ("ingest.mqtt_port", ingest.mqtt_port, 0, 65535),
        ("ingest.batch_max", ingest.batch_max, 1, 100_000),
        ("ingest.queue_max", ingest.queue_max, 1, 1_000_000),
        ("ingest.max_payload_bytes", ingest.max_payload_bytes, 64, 16 * 2**20),
        ("windows.length", windows.length, 0, 100_000),
        ("windows.stride", windows.stride, 1, 100_000),
        ("windows.horizon", windows.horizon, 1, 100_000),
    ):
        if not low <= value <= high:
            bad(key, value)
    if config.mqtt_source and not ingest.mqtt_host and config.broker.tls_cert_file:
        problems.append(
            (
                "ingest.mqtt_host",
                "ingest.mqtt_host = '' reads plant data from the cloud's broker, but "
                "broker.tls_cert_file says that broker is locked down (broker-config): it "
                "carries no plant data and takes one connection per certificate; set "
                "ingest.mqtt_host to the site's plant-data broker",
            )
        )
    if not 0 < windows.period_s <= 86_400:
        bad("windows.period_s", windows.period_s)
    if not 0 <= windows.max_gap_s <= 1e7:
        bad("windows.max_gap_s", windows.max_gap_s)
    if not 0 <= windows.test_fraction <= 0.9:
        bad("windows.test_fraction", windows.test_fraction)
    if windows.label_mode not in ("tag", "next_value"):
        bad("windows.label_mode", windows.label_mode)
    if windows.uniform_labels not in ("on", "off"):
        bad("windows.uniform_labels", windows.uniform_labels)
    if list(windows.label_bins) != sorted(set(windows.label_bins)):
        bad("windows.label_bins", list(windows.label_bins))
    if windows.label_mode == "next_value" and not windows.label_bins:
        problems.append(
            ("windows.label_bins", "windows.label_mode = 'next_value' needs windows.label_bins")
        )
    if config.training.source == "buffer" and not windows.tags:
        problems.append(
            (
                "windows.tags",
                "training.source = 'buffer' needs windows.tags: the feature tags in the "
                "model's input order",
            )
        )
    for tag in windows.tags:
        if (why := tag_problem(tag, slash=True)) is not None:
            problems.append(("windows.tags", f"windows.tags: tag {tag!r} {why}"))
    if windows.label_tag and (why := tag_problem(windows.label_tag, slash=True)) is not None:
        problems.append(("windows.label_tag", f"windows.label_tag = {windows.label_tag!r} {why}"))
    for index, source in enumerate(config.mqtt_source, start=1):
        where = f"[[mqtt_source]] number {index}"
        if not _is_topic_filter(source.topic):
            problems.append(
                (
                    "mqtt_source",
                    f"{where}: topic {source.topic!r} is not a filter ('+' and '#' only as a "
                    "whole level, '#' only last, no leading '$')",
                )
            )
        if source.format not in ("json", "sparkplug"):
            problems.append(
                ("mqtt_source", f"{where}: format {source.format!r} is not json | sparkplug")
            )
        if source.tag and (why := tag_problem(source.tag, slash=source.format == "sparkplug")):
            problems.append(("mqtt_source", f"{where}: tag {source.tag!r} {why}"))
    credentials: dict[str, str] = {}
    for index, opcua in enumerate(config.opcua_source, start=1):
        where = f"[[opcua_source]] number {index}"
        if opcua.name:
            try:
                validate_identifier(opcua.name, what="name")
            except InvalidIdentifier as exc:
                problems.append(("opcua_source", f"{where}: {exc}"))
            else:
                where = f"[[opcua_source]] {opcua.name!r}"
        credential = _opcua_credential_name(opcua.name, index - 1)
        if credential in credentials:
            problems.append(
                (
                    "opcua_source",
                    f"{where}: its systemd credential name {credential!r} is also that of "
                    f"{credentials[credential]}; give each source its own name",
                )
            )
        credentials.setdefault(credential, where)
        if not opcua.endpoint.startswith("opc.tcp://"):
            problems.append(
                ("opcua_source", f"{where}: endpoint {opcua.endpoint!r} is not opc.tcp://…")
            )
        elif (why := url_host_problem(opcua.endpoint)) is not None:
            problems.append(
                ("opcua_source", f"{where}: endpoint {opcua.endpoint!r} has a bad host ({why})")
            )
        if not opcua.tags:
            problems.append(("opcua_source", f"{where}: tags is empty; map tag = node id"))
        nodes: dict[tuple[object, ...], str] = {}
        for tag, node_id in opcua.tags.items():
            if (same := nodes.setdefault(_node_key(node_id), tag)) != tag:
                problems.append(
                    (
                        "opcua_source",
                        f"{where}: tags {same!r} and {tag!r} name the same node ({node_id!r}); "
                        "subscribe to each node once",
                    )
                )
            if (why := tag_problem(tag)) is not None:
                problems.append(("opcua_source", f"{where}: tag {tag!r} {why}"))
            if not _NODE_ID.fullmatch(node_id):
                problems.append(
                    (
                        "opcua_source",
                        f"{where}: tag {tag!r} maps to {node_id!r}, not an OPC-UA node id "
                        '("ns=2;s=Name", "ns=3;i=1001", "i=2258")',
                    )
                )
    return problems


def _scoring_problems(config: AgentConfig) -> list[tuple[str, str]]:
    """The [scoring] settings."""
    problems: list[tuple[str, str]] = []
    scoring = config.scoring

    def bad(key: str, value: object) -> None:
        problems.append((key, f"{key} = {value!r} is not {_ALLOWED[key]}"))

    if scoring.enabled not in ("auto", "on", "off"):
        bad("scoring.enabled", scoring.enabled)
    for key, topic in (
        ("scoring.topic", scoring.topic),
        ("scoring.alert_topic", scoring.alert_topic),
    ):
        if topic and (
            not _is_topic_filter(topic) or "+" in topic.split("/") or topic.endswith("#")
        ):
            bad(key, topic)
    if not 0 <= scoring.alert_threshold <= 1:
        bad("scoring.alert_threshold", scoring.alert_threshold)
    if not all(c.isdigit() and int(c) <= 100_000 for c in scoring.alert_classes):
        bad("scoring.alert_classes", list(scoring.alert_classes))
    for key, count in (
        ("scoring.alert_raise_after", scoring.alert_raise_after),
        ("scoring.alert_clear_after", scoring.alert_clear_after),
    ):
        if not 1 <= count <= 10_000:
            bad(key, count)
    if not -1 <= scoring.normal_class <= 100_000:
        bad("scoring.normal_class", scoring.normal_class)
    if not 0 <= scoring.interval_s <= 86_400:
        bad("scoring.interval_s", scoring.interval_s)
    if not 0 <= scoring.settle_s <= 3600:
        bad("scoring.settle_s", scoring.settle_s)
    return problems


def validate_config(config: AgentConfig, *, require_complete: bool = True) -> list[str]:
    """Every problem with ``config`` as a message naming key, value and what is allowed.

    Empty when the configuration is fine. With ``require_complete=False`` an empty
    ``coordinator_public_key`` is accepted (a non-empty one must still parse).
    """
    return [message for _, message in _key_problems(config, require_complete=require_complete)]


def _toml_value(value: object) -> object:
    if value is None:
        return ""
    return list(value) if isinstance(value, tuple) else value


def config_as_dict(config: AgentConfig) -> dict[str, object]:
    """The configuration as nested TOML-ready data (what :func:`write_config` writes).

    ``training.seed = None`` appears as ``""`` because TOML has no null.
    """
    data: dict[str, object] = {}
    for field in msgspec.structs.fields(AgentConfig):
        value = getattr(config, field.name)
        if isinstance(value, msgspec.Struct):
            data[field.name] = {
                sub.name: _toml_value(getattr(value, sub.name))
                for sub in msgspec.structs.fields(value)
            }
        elif field.name in _LISTS:
            if value:  # an empty array of tables is simply absent from the file
                data[field.name] = [msgspec.to_builtins(entry) for entry in value]
        else:
            data[field.name] = value
    return data


_FILE_HEADER: Final = (
    "# fedgate-agent configuration (written by fedgate-agent).\n"
    "# All keys: `fedgate-agent config show`; FEDGATE_<KEY> environment variables override.\n\n"
)


def write_config(path: Path, config: AgentConfig) -> None:
    """Write ``config`` to ``path`` atomically, creating parent directories.

    The configuration is validated first (an empty ``coordinator_public_key`` is allowed,
    so a not-yet-enrolled agent can be written). An existing file keeps its mode and, where
    permitted, its owner; a new file gets mode 0640. If anything fails, the old file is left
    untouched and no temporary file remains; a path that cannot be written is a
    :class:`ConfigError` naming it.
    """
    _raise_problems(validate_config(config, require_complete=False), str(path))
    text = _FILE_HEADER + tomli_w.dumps(config_as_dict(config))
    try:
        atomic_write(path, text.encode("utf-8"))
    except OSError as exc:  # its folder is a file, no permission, disk full
        raise ConfigError(f"cannot write {path}: {exc.strerror or exc}") from None


def set_config_value(path: Path, key: str, value: str) -> AgentConfig:
    """Set one dotted ``key`` in the file at ``path`` to ``value`` (parsed to its type).

    The whole resulting configuration is validated (as for an agent not yet enrolled:
    an empty ``coordinator_public_key`` is fine) before anything is written; on any error
    the file is unchanged. Environment overrides are not applied: only the file's own
    content is written back. Returns the new configuration.
    """
    return set_config_values(path, {key: value})


def set_config_values(path: Path, values: Mapping[str, str]) -> AgentConfig:
    """:func:`set_config_value` for several keys at once: all of them are written, or
    (on any error) none."""
    for key in values:
        if key not in _SCHEMA:
            message = _unknown_key_problem(key, "the agent configuration")
            raise _config_error(message)
    raw = _read_raw(path)
    where = str(path)
    for key, value in values.items():
        _set_raw(raw, key, _parse_text(key, value, source=key))
    _raise_problems(_shape_problems(raw, where), where)
    config = _from_raw(raw)
    _raise_problems(validate_config(config, require_complete=False), where)
    atomic_write(path, (_FILE_HEADER + tomli_w.dumps(config_as_dict(config))).encode("utf-8"))
    return config
