"""coordinator.toml: what a coordinator serves and how (read and validated before any IO)."""

from __future__ import annotations

import difflib
import os
import re
import tempfile
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgspec
import tomli_w
from fedgate_common.atomic_files import file_in_the_way
from fedgate_common.errors import BrokerTlsInvalid, FedgateError
from fedgate_common.hosts import host_problem
from fedgate_common.identifiers import validate_identifier
from fedgate_common.model_spec import DEFAULT_MODEL, ModelSpec
from fedgate_common.mqtt_tls import client_tls_context
from fedgate_common.secagg.site_dp import MAX_POOLED_BATCH
from fedgate_common.service_units import SettingPath, load_credentials_into
from fedgate_common.topics import FEDERATION

from fedgate_coordinator.errors import ConfigError
from fedgate_coordinator.mqtt_link import MqttSettings
from fedgate_coordinator.rate_limit import RateLimitSettings, rate_limit_problems
from fedgate_coordinator.rounds import RoundSettings
from fedgate_coordinator.secure_rounds import SecAggSettings, secagg_problems
from fedgate_coordinator.site_privacy import SitePrivacySettings, site_privacy_problems

CONFIG_NAME = "coordinator.toml"
KEY_NAME = "coordinator.key"
DEFAULT_STATE_DIR = Path("/var/lib/fedgate-coordinator")
# Longer than the default id (fedgate-coordinator-<deployment>-<cloud>, up to 149).
MAX_CLIENT_ID = 256


class PeerBroker(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How this coordinator logs in to one peer cloud's broker (host and port come from
    the federation manifest): ``[federation.peers.<cloud>]`` in coordinator.toml."""

    username: str = ""
    password_file: str = ""
    tls_ca_file: str = ""
    tls_cert_file: str = ""
    tls_key_file: str = ""


class FederationSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    peers: dict[str, PeerBroker] = msgspec.field(default_factory=dict)


class CoordinatorConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    deployment: str
    cloud: str
    database_url: str
    log_level: str = "info"
    broker: MqttSettings = MqttSettings()
    rounds: RoundSettings = RoundSettings()
    secagg: SecAggSettings = SecAggSettings()
    privacy: SitePrivacySettings = SitePrivacySettings()
    model: ModelSpec = DEFAULT_MODEL
    federation: FederationSettings = FederationSettings()
    rate_limit: RateLimitSettings = RateLimitSettings()


def validate(config: CoordinatorConfig) -> list[str]:
    """Every problem with ``config``, phrased as what to fix."""
    problems: list[str] = []
    for name in ("deployment", "cloud"):
        try:
            validate_identifier(getattr(config, name), what=name)
        except ValueError as exc:
            problems.append(str(exc))
    if config.cloud == FEDERATION:
        problems.append(f"cloud={FEDERATION!r} is reserved for federation topics; pick another id")
    if config.log_level not in ("debug", "info", "warning", "error"):
        problems.append(f"log_level={config.log_level!r}: use debug, info, warning or error")
    if (why := host_problem(config.broker.host)) is not None:
        problems.append(
            f"broker.host={config.broker.host!r} is not a host name or IP address ({why})"
        )
    if not 1 <= config.broker.port <= 65535:
        problems.append(f"broker.port={config.broker.port}: use 1..65535")
    if not 1 <= config.broker.keepalive_s <= 65535:
        problems.append(f"broker.keepalive_s={config.broker.keepalive_s}: use 1..65535 (seconds)")
    client_id = config.broker.client_id
    if len(client_id) > MAX_CLIENT_ID or any(c.isspace() or not c.isprintable() for c in client_id):
        problems.append(
            f"broker.client_id={client_id[:40]!r}{'…' if len(client_id) > 40 else ''}: use "
            f'at most {MAX_CLIENT_ID} characters without spaces, or "" for '
            "fedgate-coordinator-<deployment>-<cloud>"
        )
    if config.broker.protocol not in ("auto", "5", "3.1.1"):
        problems.append(f"broker.protocol={config.broker.protocol!r}: use auto, 5 or 3.1.1")
    if not 1 <= config.broker.queue_size <= 100_000:
        problems.append("broker.queue_size: use 1..100000")
    logins: list[tuple[str, MqttSettings | PeerBroker]] = [("broker", config.broker)]
    logins += [(f"federation.peers.{c}", p) for c, p in config.federation.peers.items()]
    for where, login in logins:
        for name in ("password_file", "tls_ca_file", "tls_cert_file", "tls_key_file"):
            path = getattr(login, name)
            if path and not os.path.isfile(path):
                problems.append(f"{where}.{name}={path!r}: no such file")
        tls_files = [login.tls_ca_file, login.tls_cert_file, login.tls_key_file]
        if (login.tls_cert_file or login.tls_key_file) and not login.tls_ca_file:
            problems.append(
                f"{where}.tls_cert_file/tls_key_file need {where}.tls_ca_file (TLS) as well"
            )
        elif login.tls_ca_file and all(os.path.isfile(path) for path in tls_files if path):
            try:  # loads the files: a CA or key that does not load is caught here
                client_tls_context(
                    ca_file=login.tls_ca_file,
                    cert_file=login.tls_cert_file,
                    key_file=login.tls_key_file,
                    what=where,
                )
            except BrokerTlsInvalid as exc:
                problems.append(str(exc))
    r = config.rounds
    if r.min_participants < 1:
        problems.append("rounds.min_participants must be at least 1")
    if not 0 < r.update_timeout_s <= 86_400:
        problems.append("rounds.update_timeout_s must be in (0, 86400]")
    if not 0 <= r.pause_between_rounds_s <= 86_400:
        problems.append("rounds.pause_between_rounds_s must be in [0, 86400]")
    if not 0 < r.learning_rate <= 10 or not 0 < r.lr_decay <= 1:
        problems.append("rounds.learning_rate must be in (0, 10] and rounds.lr_decay in (0, 1]")
    if not 0 <= r.momentum < 1:
        problems.append("rounds.momentum must be in [0, 1)")
    if not 1 <= r.max_weight <= 10**9 or not 0 < r.max_update_norm <= 1e12:
        problems.append("rounds.max_weight must be 1..1e9 and rounds.max_update_norm in (0, 1e12]")
    if not 1 <= r.local_epochs <= 1000 or not 1 <= r.batch_size <= 65536:
        problems.append("rounds.local_epochs must be 1..1000 and rounds.batch_size 1..65536")
    problems.extend(secagg_problems(config.secagg))
    problems.extend(site_privacy_problems(config.privacy))
    problems.extend(rate_limit_problems(config.rate_limit))
    if config.privacy.enabled and config.secagg.aggregation != "secagg":
        problems.append(
            "privacy.site_level=on needs secagg.aggregation=secagg: the noise is added by the "
            "agents to their masked inputs"
        )
    if config.privacy.enabled and config.secagg.word_bits != 32:
        problems.append(
            "privacy.site_level=on needs secagg.word_bits=32: 16-bit words leave too little "
            "room for the noise, and the coarse quantization would cost privacy"
        )
    if config.privacy.pooled:
        problems.extend(_pooled_problems(config))
    if not config.database_url.startswith(("sqlite:", "postgresql")):
        problems.append(
            f"database_url={config.database_url!r}: use sqlite:///FILE or "
            "postgresql+psycopg://USER@HOST/DB"
        )
    return problems


def _pooled_problems(config: CoordinatorConfig) -> list[str]:
    """What ``privacy.record_level = pooled`` needs besides its own settings."""
    problems = []
    if config.secagg.aggregation != "secagg" or config.secagg.word_bits != 32:
        problems.append(
            "privacy.record_level=pooled needs secagg.aggregation=secagg with "
            "secagg.word_bits=32: the noise is the agents' shares in their masked inputs"
        )
    if config.secagg.adaptive_clip:
        problems.append(
            "privacy.record_level=pooled cannot use secagg.adaptive_clip: one window can flip "
            "an agent's within-clip count"
        )
    if config.rounds.local_epochs != 1:
        problems.append(
            "privacy.record_level=pooled takes one step a round: set rounds.local_epochs = 1"
        )
    if config.rounds.batch_size > MAX_POOLED_BATCH:
        problems.append(
            f"rounds.batch_size={config.rounds.batch_size}: privacy.record_level=pooled takes "
            f"at most {MAX_POOLED_BATCH} windows a step (the agents refuse more: the float32 "
            "sum of the clipped gradients could round by more than the noise allows for)"
        )
    return problems


def credential_names(raw: Mapping[str, Any]) -> dict[SettingPath, str]:
    """Secret-file settings of a raw coordinator.toml and their systemd credential names
    (``fedgate-coordinator install-service`` writes the matching ``LoadCredential=``)."""
    names: dict[SettingPath, str] = {
        ("broker", "password_file"): "broker-password",
        ("broker", "tls_key_file"): "broker-tls-key",
    }
    federation = raw.get("federation", {})
    peers = federation.get("peers", {}) if isinstance(federation, dict) else {}
    for cloud in peers if isinstance(peers, dict) else {}:
        if re.fullmatch(r"[A-Za-z0-9_.-]{1,48}", str(cloud)):
            peer = ("federation", "peers", str(cloud))
            names[(*peer, "password_file")] = f"peer-{cloud}-password"
            names[(*peer, "tls_key_file")] = f"peer-{cloud}-tls-key"
    return names


def check_state_dir(state_dir: Path) -> None:
    """Raise :class:`ConfigError` when ``state_dir``, or the nearest of its parents that
    exists, is not a directory (a missing state directory is fine: ``init`` creates it)."""
    if (blocker := file_in_the_way(state_dir)) is not None:
        raise ConfigError(
            f"state directory {state_dir}: {blocker} is not a directory (a file, or a link "
            "to nothing); pass the coordinator's state directory (--state-dir or "
            "FEDGATE_COORDINATOR_STATE_DIR)"
        )


def load_config(state_dir: Path) -> CoordinatorConfig:
    check_state_dir(state_dir)
    path = state_dir / CONFIG_NAME
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(
            f"{path} not found: run `fedgate-coordinator init` first or pass --state-dir"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:  # a directory, unreadable, not text
        raise ConfigError(f"cannot read {path}: {exc}") from None
    # Under systemd, secret files come from $CREDENTIALS_DIRECTORY (LoadCredential).
    load_credentials_into(raw, credential_names(raw), os.environ, exists=os.path.isfile)
    try:
        config = msgspec.convert(raw, CoordinatorConfig)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{path}: {explain_shape_error(str(exc), raw)}") from None
    except FedgateError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    problems = validate(config)
    if problems:
        raise ConfigError(f"{path}: " + "; ".join(problems), problems=problems)
    return config


_UNKNOWN_KEY = re.compile(
    r"Object contains unknown field `(?P<name>[^`]*)`(?: - at `\$(?P<at>[^`]*)`)?"
)
_WRONG_TYPE = re.compile(r"Expected `(?P<want>[^`]*)`, got `(?P<got>[^`]*)` - at `\$(?P<at>[^`]*)`")
_TYPE_WORDS = {"float": "a number", "int": "a whole number", "str": "a quoted string"}
# Keys of the agent's [privacy] an operator may copy here, and the coordinator's own.
_AGENT_KEYS = {
    "record_noise": 'record_level = "pooled" (the agents set record_noise)',
    "max_grad_norm": "record_clip_norm (the agents' privacy.max_grad_norm)",
}


def _struct_at(parts: list[str]) -> type[msgspec.Struct] | None:
    """The struct type of the table at ``parts`` in coordinator.toml (None: not a struct)."""
    struct: type[msgspec.Struct] = CoordinatorConfig
    for part in parts:
        field = {f.name: f for f in msgspec.structs.fields(struct)}.get(part)
        annotation = None if field is None else field.type
        if not (isinstance(annotation, type) and issubclass(annotation, msgspec.Struct)):
            return None
        struct = annotation
    return struct


def explain_shape_error(message: str, raw: Mapping[str, Any]) -> str:
    """msgspec's complaint about coordinator.toml, as the key to fix and how: an unknown
    key with the closest known one, a value of the wrong type with the value."""
    unknown = _UNKNOWN_KEY.fullmatch(message)
    if unknown is not None:
        parts = [p for p in (unknown["at"] or "").split(".") if p]
        name = unknown["name"]
        key = ".".join([*parts, name])
        struct = _struct_at(parts)
        known = [f.name for f in msgspec.structs.fields(struct)] if struct is not None else []
        if name in _AGENT_KEYS and parts == ["privacy"]:
            hint = f"; this is an agent's key, the coordinator's is privacy.{_AGENT_KEYS[name]}"
        else:
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
            hint = f"; did you mean {'.'.join([*parts, close[0]])!r}?" if close else ""
        where = f"[{'.'.join(parts)}]" if parts else "the top level"
        listing = f" (keys in {where}: {', '.join(known)})" if known else ""
        return f"unknown key {key!r}{hint}{listing}"
    wrong = _WRONG_TYPE.fullmatch(message)
    if wrong is not None:
        parts = [p for p in wrong["at"].split(".") if p]
        value: Any = raw
        for part in parts:
            value = value.get(part) if isinstance(value, Mapping) else None
        want = _TYPE_WORDS.get(wrong["want"], wrong["want"])
        unquote = " (write it without quotes)" if isinstance(value, str) else ""
        return f"{'.'.join(parts)} = {value!r}: use {want}{unquote}"
    return message


def config_as_dict(config: CoordinatorConfig) -> dict[str, Any]:
    data: dict[str, Any] = msgspec.to_builtins(config)
    return data


def write_config(state_dir: Path, config: CoordinatorConfig) -> Path:
    """Write atomically (temp file, fsync, rename)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / CONFIG_NAME
    fd, tmp = tempfile.mkstemp(dir=state_dir, prefix=".coordinator.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            tomli_w.dump(config_as_dict(config), handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o640)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
