"""``fedgate-coordinator federation``: write, sign, check and install the federation manifest.

The manifest (:mod:`fedgate_common.consensus.manifest`) is a JSON file the operators of all
clouds pass around: one creates it (``init``), every coordinator that must approve it signs
it (``sign``), each checks it (``verify``) and installs it (``install``) into its state
directory as ``federation.json``.

``cli`` registers this group;
exit codes, the error guard and JSON output come from ``cli_support``.
"""

from __future__ import annotations

import functools
import secrets
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click
import msgspec
import nacl.signing
from fedgate_common.atomic_files import atomic_write
from fedgate_common.consensus.manifest import (
    CROSS_CLOUD_RULES,
    MAX_MANIFEST_BYTES,
    CloudEntry,
    ConsensusParams,
    Manifest,
    SignatureStatus,
    SignedManifest,
    add_signature,
    decode_manifest_file,
    encode_manifest_file,
    faults,
    key_fingerprint,
    manifest_digest,
    manifest_problems,
    quorum,
    sign_manifest,
    signature_status,
    succession_problems,
    verify_chain,
)
from fedgate_common.consensus.quorum import quorum_size, tolerance_text
from fedgate_common.errors import FedgateError, ManifestInvalid
from fedgate_common.genesis_weights import (
    GenesisWeights,
    genesis_weights_digest,
    read_genesis_weights,
)
from fedgate_common.keys import public_key_text

from fedgate_coordinator.cli_support import ExitCode, echo_json, fail, guard
from fedgate_coordinator.config import KEY_NAME, CoordinatorConfig, load_config
from fedgate_coordinator.errors import ConfigError
from fedgate_coordinator.genesis import (
    GENESIS_WEIGHTS_NAME,
    federation_genesis,
    genesis_record,
    install_genesis_weights,
    installed_genesis_weights,
)
from fedgate_coordinator.signing_key import load_signing_key

if TYPE_CHECKING:
    from fedgate_coordinator.cli import Context

MANIFEST_NAME = "federation.json"

_WEIGHTS_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)

FEDERATION_EXIT_CODES = """\b
Exit codes:
  0 success          1 unexpected failure   2 bad command line
  3 config/key error (coordinator.toml or coordinator.key missing or invalid,
    --cloud lists this cloud with another key, model spec differs from the manifest,
    a --genesis-weights file unreadable or not for this model spec)
  4 store error (install: the store cannot be opened)
  8 the federation manifest is invalid or not signed by a quorum"""

F = TypeVar("F", bound=Callable[..., Any])


def _guard(func: F) -> F:
    """The coordinator's error guard, with a manifest's problems one per line."""

    @guard
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except ManifestInvalid as exc:
            fail(str(exc), ExitCode.MANIFEST, problems=exc.problems)

    return wrapper  # type: ignore[return-value]


# --- files -----------------------------------------------------------------------------------


def read_manifest_file(path: Path) -> SignedManifest:
    """Decode a manifest file; every failure is :class:`ManifestInvalid` naming ``path``."""
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_MANIFEST_BYTES + 1)
    except OSError as exc:
        raise ManifestInvalid(f"{path}: cannot read: {exc.strerror}") from None
    try:
        return decode_manifest_file(data)
    except ManifestInvalid as exc:
        raise ManifestInvalid(f"{path}: {exc}") from None


def write_manifest_file(path: Path, signed: SignedManifest, *, mode: int = 0o644) -> None:
    """Write atomically (:func:`~fedgate_common.atomic_files.atomic_write`); a path that
    cannot be written (its folder is a file, no permission, disk full) is a
    :class:`ConfigError` naming it."""
    try:
        atomic_write(path, encode_manifest_file(signed), mode=mode)
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror or exc}") from None


def installed_manifest(state_dir: Path) -> SignedManifest | None:
    """The manifest installed in ``state_dir``, or None when there is none."""
    path = state_dir / MANIFEST_NAME
    if not path.exists():
        return None
    return read_manifest_file(path)


def _own_identity(state_dir: Path) -> tuple[CoordinatorConfig, nacl.signing.SigningKey]:
    return load_config(state_dir), load_signing_key(state_dir / KEY_NAME)


def _read_all(paths: Sequence[Path]) -> list[SignedManifest]:
    return sorted((read_manifest_file(p) for p in paths), key=lambda s: s.manifest.version)


def _predecessor(
    signed: SignedManifest, given: Path | None, installed: SignedManifest | None
) -> SignedManifest | None:
    """Version n − 1 of ``signed`` (None for version 1): ``given``, else the installed one
    when it is the predecessor."""
    manifest = signed.manifest
    if manifest.version <= 1:
        return None
    if given is not None:
        previous = read_manifest_file(given)
        if manifest_digest(previous.manifest) != manifest.previous_digest:
            raise ManifestInvalid(
                f"{given} (version {previous.manifest.version}) is not the manifest that "
                f"version {manifest.version} follows: its digest is not previous_digest"
            )
        return previous
    if installed is not None and manifest_digest(installed.manifest) == manifest.previous_digest:
        return installed
    raise ManifestInvalid(
        f"version {manifest.version} is approved by the clouds of version "
        f"{manifest.version - 1}, which is not installed here: pass it with --previous FILE"
    )


# --- presentation ----------------------------------------------------------------------------


def _signatures_data(signed: SignedManifest, status: SignatureStatus | None) -> dict[str, Any]:
    if status is None:
        return {
            "present": list(signed.signed_by()),
            "count": len(signed.signed_by()),
            "needed": None,
            "checked": False,
        }
    return {
        "present": list(status.valid),
        "count": len(status.valid),
        "needed": status.needed,
        "signers": list(status.signers),
        "missing": list(status.missing),
        "invalid": list(status.invalid),
        "ignored": list(status.ignored),
        "checked": True,
    }


def _needed_text(manifest: Manifest, status: SignatureStatus) -> str:
    if manifest.version <= 1:
        return f"version 1 needs all {status.needed} clouds"
    return (
        f"version {manifest.version} needs {status.needed} of the {len(status.signers)} "
        f"clouds of version {manifest.version - 1}"
    )


def _signatures_line(manifest: Manifest, status: SignatureStatus) -> str:
    line = f"signatures: {len(status.valid)} of {status.needed} ({_needed_text(manifest, status)})"
    if status.missing:
        line += f"; missing: {', '.join(status.missing)}"
    if status.invalid:
        line += f"; NOT VERIFYING: {', '.join(status.invalid)}"
    return line


def manifest_summary(
    signed: SignedManifest, status: SignatureStatus | None = None
) -> dict[str, Any]:
    """What ``show --json`` prints."""
    manifest = signed.manifest
    count = len(manifest.clouds)
    return {
        "deployment": manifest.deployment,
        "version": manifest.version,
        "digest": manifest_digest(manifest),
        "previous_digest": manifest.previous_digest,
        "created_at": manifest.created_at,
        "clouds": [
            {
                "cloud": entry.cloud,
                "public_key": entry.public_key,
                "fingerprint": key_fingerprint(entry.public_key),
                "broker": entry.broker,
                "tls": entry.tls,
            }
            for entry in manifest.clouds
        ],
        "quorum": quorum(manifest) if count else None,
        "faults_tolerated": faults(manifest) if count else None,
        "tolerance": tolerance_text(count) if count else "no cloud",
        "rule": manifest.consensus.rule,
        "server_momentum": manifest.momentum,
        "consensus": msgspec.to_builtins(manifest.consensus),
        "model_spec": msgspec.to_builtins(manifest.model_spec),
        "genesis_seed": manifest.genesis_seed,
        "genesis_digest": manifest.genesis_digest,
        "genesis_source": manifest.genesis_source,
        "signatures": _signatures_data(signed, status),
    }


def _echo_summary(signed: SignedManifest, status: SignatureStatus | None) -> None:
    manifest = signed.manifest
    data = manifest_summary(signed, status)
    params = manifest.consensus
    click.echo(f"deployment {manifest.deployment}, manifest version {manifest.version}")
    click.echo(f"  digest:     {data['digest']}")
    if manifest.previous_digest:
        click.echo(f"  previous:   {manifest.previous_digest}")
    click.echo(f"  created:    {manifest.created_at}")
    click.echo(f"  federation: {data['tolerance']}")
    click.echo("  clouds (in proposer order):")
    for cloud in data["clouds"]:
        tls = " (TLS)" if cloud["tls"] else ""
        click.echo(
            f"    {cloud['cloud']:<16} key {cloud['fingerprint']}  broker {cloud['broker']}{tls}"
        )
    click.echo(
        f"  rule:       {params.rule} (cloud weight cap {params.cloud_weight_cap}, "
        f"max update norm {params.max_update_norm:g})"
    )
    if manifest.momentum:
        click.echo(f"  momentum:   {manifest.momentum:g} (heavy-ball, on the decided models)")
    click.echo(
        f"  timeouts:   propose {params.timeout_propose_s:g}s, prevote "
        f"{params.timeout_prevote_s:g}s, precommit {params.timeout_precommit_s:g}s, "
        f"+{params.timeout_delta_s:g}s per consensus round; aggregates "
        f"{params.aggregate_wait_s:g}s"
    )
    click.echo(f"  genesis:    {manifest.genesis_digest} ({_genesis_origin(manifest)})")
    if status is None:
        present = ", ".join(signed.signed_by()) or "none"
        click.echo(
            f"  signatures: {present} (not checked: version {manifest.version - 1} "
            "is not known here; pass --previous FILE)"
        )
    else:
        click.echo(f"  {_signatures_line(manifest, status)}")


def _genesis_origin(manifest: Manifest) -> str:
    if manifest.genesis_source == "weights":
        return f"pre-trained weights, trained from seed {manifest.genesis_seed}"
    return f"seed {manifest.genesis_seed}"


def _weights_for(path: Path, config: CoordinatorConfig) -> GenesisWeights:
    """The genesis weights in ``path``, which must be for coordinator.toml's model spec."""
    weights = read_genesis_weights(path)
    if weights.spec != config.model:
        raise ConfigError(
            f"{path} holds weights for another model spec than coordinator.toml [model]: "
            f"{msgspec.json.encode(weights.spec).decode()}"
        )
    return weights


def _genesis_weights(obj: Context, manifest: Manifest, path: Path | None) -> GenesisWeights | None:
    """The weights to check a pre-trained genesis against: ``path``, else the file kept in
    the state directory; ``None`` for a genesis derived from the seed."""
    if manifest.genesis_source == "seed":
        if path is not None:
            raise click.UsageError(
                "--genesis-weights: this manifest's genesis is derived from its seed, "
                "not pre-trained"
            )
        return None
    return (
        read_genesis_weights(path) if path is not None else installed_genesis_weights(obj.state_dir)
    )


# --- parsing ---------------------------------------------------------------------------------


def parse_cloud_option(text: str) -> CloudEntry:
    """``ID=ed25519:KEY@HOST:PORT``; ``mqtts://HOST:PORT`` marks a TLS broker."""
    cloud, sep, rest = text.partition("=")
    key, at, broker = rest.partition("@")
    if not sep or not at:
        raise click.BadParameter(
            f"{text!r}: use ID=ed25519:KEY@HOST:PORT (mqtts://HOST:PORT for TLS)",
            param_hint="--cloud",
        )
    tls = broker.startswith("mqtts://")
    broker = broker.removeprefix("mqtts://").removeprefix("mqtt://")
    try:
        return CloudEntry(cloud=cloud.strip(), public_key=key.strip(), broker=broker, tls=tls)
    except FedgateError as exc:
        raise click.BadParameter(str(exc), param_hint="--cloud") from None


def _merge_clouds(
    base: Sequence[CloudEntry], changes: Sequence[CloudEntry], removed: Sequence[str]
) -> tuple[CloudEntry, ...]:
    """``base`` with entries of the same id replaced in place, new ones appended, and
    ``removed`` ids dropped."""
    known = {entry.cloud for entry in base}
    for cloud in removed:
        if cloud not in known:
            raise click.BadParameter(
                f"cloud {cloud} is not in the manifest", param_hint="--remove-cloud"
            )
    replaced = {entry.cloud: entry for entry in changes}
    merged = [replaced.pop(entry.cloud, entry) for entry in base]
    merged.extend(replaced.values())
    return tuple(entry for entry in merged if entry.cloud not in removed)


def _utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- commands --------------------------------------------------------------------------------


@click.group(epilog=FEDERATION_EXIT_CODES)
def federation() -> None:
    """Federation manifest: which clouds, keys and brokers form this deployment.

    Version 1 is valid when every cloud it lists has signed it; version n+1 when a quorum
    of the clouds of version n has. Adding or removing a cloud or rotating a key is a new
    version (`init --next`). Nobody holds a master key.

    \b
    Example (4 clouds; quorum 3, tolerates 1 faulty coordinator):
      fedgate-coordinator federation init --out federation-v1.json \\
          --cloud cloud-2=ed25519:9f1c...@mqtt.cloud-2.example:8883 \\
          --cloud cloud-3=ed25519:47aa...@mqtt.cloud-3.example:8883 \\
          --cloud cloud-4=ed25519:c20e...@mqtt.cloud-4.example:8883
      fedgate-coordinator federation sign federation-v1.json      # on every cloud
      fedgate-coordinator federation verify federation-v1.json
      fedgate-coordinator federation install federation-v1.json   # on every cloud
    """


@federation.command("init", epilog=FEDERATION_EXIT_CODES)
@click.option(
    "--cloud",
    "clouds",
    multiple=True,
    metavar="ID=ed25519:KEY@HOST:PORT",
    help="A cloud: id, its coordinator's public key (`fedgate-coordinator status`) and "
    "the broker peers reach it at (mqtts://HOST:PORT for TLS). Repeat; the order fixes "
    "proposer rotation. With --next: replaces the entry of that id, or adds one.",
)
@click.option(
    "--next",
    "current_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Make the version after this manifest (same deployment, model and genesis).",
)
@click.option(
    "--remove-cloud", "removed", multiple=True, metavar="ID", help="With --next: drop a cloud."
)
@click.option(
    "--rule",
    type=click.Choice(CROSS_CLOUD_RULES),
    default=None,
    help="Cross-cloud rule (default capped_mean; with --next: unchanged). "
    "trimmed_mean, median and centered_clip need at least 4 clouds.",
)
@click.option(
    "--cloud-weight-cap",
    type=click.IntRange(1, 10**9),
    default=None,
    help="Participant count a cloud's aggregate weighs at most (default 1000).",
)
@click.option(
    "--max-update-norm",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Largest L2 norm of a per-cloud mean update (default 1000).",
)
@click.option(
    "--server-momentum",
    type=click.FloatRange(0, 1, max_open=True),
    default=None,
    help="Heavy-ball momentum β of the decided models: each height adds β times the "
    "previous height's step (default 0; with --next: unchanged). Pooled record-level DP "
    "takes one step a round and needs it (privacy.md 3.7: 0.8).",
)
@click.option(
    "--genesis-seed",
    type=click.IntRange(0, 2**63 - 1),
    default=None,
    help="Seed of the genesis model's weights (default: fresh randomness; not with --next).",
)
@click.option(
    "--genesis-weights",
    "genesis_weights_path",
    type=_WEIGHTS_FILE,
    default=None,
    help="Start the federation from a model pre-trained on public data: the file "
    "`fedgate-agent pretrain` wrote, for coordinator.toml's model spec. Every cloud needs "
    "the same file to sign and install the manifest. Not with --genesis-seed or --next.",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="File to write (default federation-v<VERSION>.json); never overwritten.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_obj
@_guard
def init_manifest(
    obj: Context,
    clouds: tuple[str, ...],
    current_path: Path | None,
    removed: tuple[str, ...],
    rule: str | None,
    cloud_weight_cap: int | None,
    max_update_norm: float | None,
    server_momentum: float | None,
    genesis_seed: int | None,
    genesis_weights_path: Path | None,
    out: Path | None,
    as_json: bool,
) -> None:
    """Write an unsigned manifest for this coordinator's deployment and model spec.

    Version 1 lists the --cloud entries; this coordinator's cloud is added from its
    coordinator.toml and key when it is not among them. The genesis model is derived from
    the model spec in coordinator.toml and a fresh seed, or is the pre-trained model of
    --genesis-weights. With --next FILE, the version after FILE: its clouds with the
    --cloud / --remove-cloud changes.

    \b
    Example:
      fedgate-coordinator federation init --rule median --out federation-v1.json \\
          --cloud cloud-1=ed25519:3b6a...@mqtt.cloud-1.example:8883 \\
          --cloud cloud-2=ed25519:9f1c...@mqtt.cloud-2.example:8883 ...
      fedgate-coordinator federation init --next federation-v1.json \\
          --cloud cloud-2=ed25519:77d0...@mqtt.cloud-2.example:8883 --out federation-v2.json
      fedgate-coordinator federation init --genesis-weights genesis.msgpack \\
          --cloud cloud-2=ed25519:9f1c...@mqtt.cloud-2.example:8883 ...
    """
    config, key = _own_identity(obj.state_dir)
    if genesis_weights_path is not None and (genesis_seed is not None or current_path):
        raise click.UsageError(
            "--genesis-weights excludes --genesis-seed (the file names the seed its training "
            "started from) and --next (the genesis stays that of version 1)"
        )
    own_key = public_key_text(key.verify_key)
    entries = [parse_cloud_option(text) for text in clouds]
    own_entry = next((entry for entry in entries if entry.cloud == config.cloud), None)
    notes: list[str] = []
    params_changes: dict[str, Any] = {
        name: value
        for name, value in (
            ("rule", rule),
            ("cloud_weight_cap", cloud_weight_cap),
            ("max_update_norm", max_update_norm),
        )
        if value is not None
    }
    if current_path is None:
        if removed:
            raise click.UsageError("--remove-cloud needs --next FILE")
        if own_entry is not None and own_entry.public_key != own_key:
            raise ConfigError(
                f"--cloud {config.cloud} lists key {own_entry.public_key}, but this "
                f"coordinator's key ({obj.state_dir / KEY_NAME}) is {own_key}"
            )
        if own_entry is None:
            broker = f"{config.broker.host}:{config.broker.port}"
            entries.append(CloudEntry(cloud=config.cloud, public_key=own_key, broker=broker))
            notes.append(
                f"added this coordinator's cloud {config.cloud} (key from {KEY_NAME}, "
                f"broker {broker} from coordinator.toml) as the last cloud"
            )
            if config.broker.host in ("127.0.0.1", "localhost", "::1"):
                notes.append(
                    f"warning: peers cannot reach a loopback broker ({broker}); pass "
                    f"--cloud {config.cloud}={own_key}@HOST:PORT"
                )
        seed = secrets.randbits(63) if genesis_seed is None else genesis_seed
        genesis_digest = genesis_record(config.model, seed).digest
        if genesis_weights_path is not None:
            weights = _weights_for(genesis_weights_path, config)
            seed = weights.pretraining.start_seed
            genesis_digest = genesis_weights_digest(weights)
        manifest = Manifest(
            deployment=config.deployment,
            version=1,
            previous_digest="",
            clouds=tuple(entries),
            consensus=ConsensusParams(**params_changes),
            model_spec=config.model,
            genesis_seed=seed,
            genesis_digest=genesis_digest,
            created_at=_utc_now(),
            genesis_source="seed" if genesis_weights_path is None else "weights",
            server_momentum=server_momentum or None,  # 0: left out of the manifest
        )
        approvers = manifest
    else:
        if genesis_seed is not None:
            raise click.UsageError(
                "--genesis-seed cannot change with --next: the genesis stays that of version 1"
            )
        current = read_manifest_file(current_path).manifest
        approvers = current
        if current.deployment != config.deployment:
            raise ManifestInvalid(
                f"{current_path} is a manifest of deployment {current.deployment!r}, this "
                f"coordinator serves {config.deployment!r}"
            )
        manifest = msgspec.structs.replace(
            current,
            version=current.version + 1,
            previous_digest=manifest_digest(current),
            clouds=_merge_clouds(current.clouds, entries, removed),
            consensus=msgspec.structs.replace(current.consensus, **params_changes),
            created_at=_utc_now(),
            server_momentum=(
                current.server_momentum if server_momentum is None else server_momentum or None
            ),
        )
        if own_entry is not None and own_entry.public_key != own_key:
            notes.append(
                f"note: cloud {config.cloud} gets a new key in version {manifest.version}; "
                f"install it here after replacing {KEY_NAME} with that key"
            )
        if config.cloud not in manifest.cloud_ids():
            notes.append(
                f"note: this coordinator's cloud {config.cloud} is not in version "
                f"{manifest.version}; it can sign it but not install it"
            )
    problems = manifest_problems(manifest)
    if problems:
        raise ManifestInvalid("; ".join(problems), problems=problems)
    path = out if out is not None else Path(f"federation-v{manifest.version}.json")
    if path.exists():
        raise click.UsageError(f"{path} exists; choose another --out or remove it")
    write_manifest_file(path, SignedManifest(manifest=manifest))
    signers = approvers.cloud_ids()
    needed = len(signers) if manifest.version == 1 else quorum_size(len(signers))
    if as_json:
        echo_json(
            {
                "file": str(path),
                "notes": notes,
                "signers": list(signers),
                "needed": needed,
                **manifest_summary(SignedManifest(manifest=manifest)),
            }
        )
        return
    for note in notes:
        click.echo(note, err=True)
    click.echo(f"wrote {path}: version {manifest.version} of deployment {manifest.deployment}")
    click.echo(f"  digest:     {manifest_digest(manifest)}")
    click.echo(f"  federation: {tolerance_text(len(manifest.clouds))}")
    click.echo(f"  clouds:     {', '.join(manifest.cloud_ids())}")
    click.echo(f"  genesis:    {manifest.genesis_digest} ({_genesis_origin(manifest)})")
    if manifest.genesis_source == "weights":
        click.echo(
            f"Every cloud needs {genesis_weights_path} to sign and install it "
            "(--genesis-weights); check its digest above before signing."
        )
    who = "every one of" if manifest.version == 1 else f"{needed} of"
    click.echo(
        f"Next: {who} {', '.join(signers)} signs it "
        f"(`fedgate-coordinator federation sign {path}`), then every cloud installs it."
    )


_MANIFEST_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)
_GENESIS_WEIGHTS_OPTION = click.option(
    "--genesis-weights",
    "genesis_weights_path",
    type=_WEIGHTS_FILE,
    default=None,
    help="The pre-trained genesis model's file (`fedgate-agent pretrain`), for a manifest "
    f"whose genesis is pre-trained (default: {GENESIS_WEIGHTS_NAME} in the state "
    "directory, if installed).",
)


@federation.command("sign", epilog=FEDERATION_EXIT_CODES)
@click.argument("file", type=_MANIFEST_FILE)
@click.option(
    "--previous",
    "previous_path",
    type=_MANIFEST_FILE,
    default=None,
    help="Version n-1 of the manifest, whose clouds approve version n "
    "(default: the installed manifest).",
)
@_GENESIS_WEIGHTS_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_obj
@_guard
def sign(
    obj: Context,
    file: Path,
    previous_path: Path | None,
    genesis_weights_path: Path | None,
    as_json: bool,
) -> None:
    """Add this coordinator's signature to FILE (rewritten in place, atomically).

    Refuses a manifest of another deployment, with structural problems, or whose genesis
    digest is not what its model spec and seed give (or, for a pre-trained genesis, not
    the digest of the --genesis-weights file). Version n+1 is signed with the key this
    cloud has in version n.

    \b
    Example:
      fedgate-coordinator federation sign federation-v1.json
      fedgate-coordinator federation sign federation-v3.json --previous federation-v2.json
      fedgate-coordinator federation sign federation-v1.json --genesis-weights genesis.msgpack
    """
    config, key = _own_identity(obj.state_dir)
    signed = read_manifest_file(file)
    manifest = signed.manifest
    problems = manifest_problems(manifest)
    if manifest.deployment != config.deployment:
        problems.append(
            f"the manifest is for deployment {manifest.deployment!r}, this coordinator "
            f"serves {config.deployment!r}"
        )
    needs_installed = manifest.version > 1 and previous_path is None
    installed = installed_manifest(obj.state_dir) if needs_installed else None
    previous = _predecessor(signed, previous_path, installed)
    if previous is not None:
        problems.extend(succession_problems(manifest, previous.manifest))
    if not problems:
        try:
            federation_genesis(manifest, _genesis_weights(obj, manifest, genesis_weights_path))
        except ManifestInvalid as exc:
            problems.extend(exc.problems)
    if problems:
        header = f"{file}: refusing to sign"
        raise ManifestInvalid(header, problems=[header, *problems])
    previous_manifest = previous.manifest if previous is not None else None
    signature = sign_manifest(
        manifest, cloud=config.cloud, signing_key=key, previous=previous_manifest
    )
    updated = add_signature(signed, signature)
    write_manifest_file(file, updated, mode=file.stat().st_mode & 0o777)
    status = signature_status(updated, previous=previous_manifest)
    if as_json:
        echo_json(
            {
                "file": str(file),
                "cloud": config.cloud,
                "version": manifest.version,
                "digest": manifest_digest(manifest),
                "signatures": _signatures_data(updated, status),
                "complete": status.sufficient,
            }
        )
        return
    click.echo(f"signed {file} (version {manifest.version}) as {config.cloud}")
    click.echo(f"  {_signatures_line(manifest, status)}")
    if status.sufficient:
        click.echo(
            f"Complete: every cloud can now run `federation install {file}` (add --replace "
            "the first time, to replace the one-cloud manifest `init` wrote)."
        )


@federation.command("show", epilog=FEDERATION_EXIT_CODES)
@click.argument("file", type=_MANIFEST_FILE, required=False)
@click.option(
    "--previous",
    "previous_path",
    type=_MANIFEST_FILE,
    default=None,
    help="Version n-1, to count version n's signatures (default: the installed manifest).",
)
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.pass_obj
@_guard
def show(obj: Context, file: Path | None, previous_path: Path | None, as_json: bool) -> None:
    """Show a manifest: clouds, keys, quorum, faults tolerated, rule, signatures.

    Without FILE: the manifest installed in the state directory.

    \b
    Example:
      fedgate-coordinator federation show
      fedgate-coordinator federation show federation-v2.json --json
    """
    installed = installed_manifest(obj.state_dir)
    if file is not None:
        signed = read_manifest_file(file)
    elif installed is not None:
        signed = installed
    else:
        raise ConfigError(
            f"no federation manifest installed in {obj.state_dir}: run "
            "`fedgate-coordinator federation install FILE` or pass FILE"
        )
    status: SignatureStatus | None = None
    if signed.manifest.version <= 1 or previous_path is not None:
        previous = _predecessor(signed, previous_path, installed)
        status = signature_status(signed, previous=previous.manifest if previous else None)
    elif installed is not None and (
        manifest_digest(installed.manifest) == signed.manifest.previous_digest
    ):
        status = signature_status(signed, previous=installed.manifest)
    if as_json:
        echo_json(
            {**manifest_summary(signed, status), "installed": file is None or signed == installed}
        )
        return
    _echo_summary(signed, status)


def _verify_against(
    signed: SignedManifest, previous: list[SignedManifest], installed: SignedManifest | None
) -> tuple[SignedManifest | None, bool]:
    """Verify ``signed`` (see ``verify --help``); returns its predecessor and whether that
    one was taken as trusted rather than verified."""
    if previous:
        if previous[0].manifest.version == 1:
            verify_chain([*previous, signed])
            return previous[-1], False
        verify_chain([*previous[1:], signed], trusted=previous[0])
        return previous[-1], True
    if signed.manifest.version <= 1:
        verify_chain([signed])
        return None, False
    if installed is None:
        version = signed.manifest.version
        raise ManifestInvalid(
            f"version {version} is checked against version {version - 1}, and no manifest "
            "is installed here: pass it with --previous FILE"
        )
    verify_chain([signed], trusted=installed)
    return installed, False


@federation.command("verify", epilog=FEDERATION_EXIT_CODES)
@click.argument("file", type=_MANIFEST_FILE)
@click.option(
    "--previous",
    "previous_paths",
    type=_MANIFEST_FILE,
    multiple=True,
    help="Earlier versions FILE follows, oldest first; the oldest is taken as trusted "
    "unless it is version 1 (default: the installed manifest). Repeatable.",
)
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.pass_obj
@_guard
def verify(obj: Context, file: Path, previous_paths: tuple[Path, ...], as_json: bool) -> None:
    """Check FILE: structure, succession and signatures. Exit 0 when valid, 8 when not.

    Version 1 must be signed by every cloud it lists; version n+1 by a quorum of the
    clouds of version n, with the keys listed there.

    \b
    Example:
      fedgate-coordinator federation verify federation-v1.json
      fedgate-coordinator federation verify federation-v2.json --previous federation-v1.json
    """
    signed = read_manifest_file(file)
    previous = _read_all(previous_paths)
    installed = None if previous else installed_manifest(obj.state_dir)
    problems: list[str] = []
    predecessor: SignedManifest | None = None
    trusted = False
    try:
        predecessor, trusted = _verify_against(signed, previous, installed)
    except ManifestInvalid as exc:
        problems = exc.problems
    status: SignatureStatus | None = None
    if signed.manifest.version <= 1 or predecessor is not None:
        status = signature_status(
            signed, previous=predecessor.manifest if predecessor is not None else None
        )
    if as_json:
        echo_json(
            {
                "file": str(file),
                "valid": not problems,
                "problems": problems,
                "version": signed.manifest.version,
                "digest": manifest_digest(signed.manifest),
                "previous_digest": signed.manifest.previous_digest,
                "previous_trusted_as_given": trusted,
                "signatures": _signatures_data(signed, status),
            }
        )
    elif not problems:
        click.echo(f"valid: {file}, version {signed.manifest.version}")
        click.echo(f"  digest:     {manifest_digest(signed.manifest)}")
        click.echo(f"  federation: {tolerance_text(len(signed.manifest.clouds))}")
        if status is not None:
            click.echo(f"  {_signatures_line(signed.manifest, status)}")
        if trusted and predecessor is not None:
            click.echo(
                f"  checked against version {predecessor.manifest.version} as given "
                f"({previous_paths[0]}), which was not itself verified"
            )
    if problems:
        if not as_json:
            click.echo(f"invalid: {file}", err=True)
            for problem in problems:
                click.echo(f"error: {problem}", err=True)
        sys.exit(int(ExitCode.MANIFEST))


@federation.command("install", epilog=FEDERATION_EXIT_CODES)
@click.argument("file", type=_MANIFEST_FILE)
@click.option(
    "--previous",
    "previous_paths",
    type=_MANIFEST_FILE,
    multiple=True,
    help="Versions between the installed manifest (or version 1, when none is installed) "
    "and FILE, in any order. Repeatable.",
)
@click.option(
    "--replace",
    is_flag=True,
    help="Join another federation: replace the installed manifest (e.g. the one-cloud "
    "manifest `init` wrote) by FILE of another chain, verified from version 1. Refused "
    "once the store holds models of another genesis.",
)
@_GENESIS_WEIGHTS_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_obj
@_guard
def install(
    obj: Context,
    file: Path,
    previous_paths: tuple[Path, ...],
    replace: bool,
    genesis_weights_path: Path | None,
    as_json: bool,
) -> None:
    """Verify FILE and make it this coordinator's manifest (<state-dir>/federation.json).

    FILE must be newer than the installed manifest and follow it: each version from the
    installed one to FILE is verified against the one before (versions in between come
    from --previous). With no manifest installed, or with --replace, the chain starts at
    version 1. FILE must list this coordinator's cloud with its key, name the genesis
    model its spec and seed give (or the digest of the --genesis-weights file, which is
    kept in the state directory), and have the model spec of coordinator.toml.

    \b
    Example:
      fedgate-coordinator federation install federation-v1.json --replace   # after init
      fedgate-coordinator federation install federation-v2.json
      fedgate-coordinator federation install federation-v4.json --previous federation-v3.json
      fedgate-coordinator federation install federation-v1.json --replace \\
          --genesis-weights genesis.msgpack       # a federation of a pre-trained genesis
    """
    config, key = _own_identity(obj.state_dir)
    signed = read_manifest_file(file)
    manifest = signed.manifest
    installed = installed_manifest(obj.state_dir)
    path = obj.state_dir / MANIFEST_NAME
    if installed is not None and installed.manifest == manifest:
        if genesis_weights_path is not None:  # named: it must fit, as on a first install
            weights = _genesis_weights(obj, manifest, genesis_weights_path)
            federation_genesis(manifest, weights)
            if weights is not None:
                install_genesis_weights(obj.state_dir, weights)
        _echo_installed(path, signed, as_json, already=True)
        return
    anchor = None if replace else installed
    switch_hint = (
        "to leave the installed federation for another one (e.g. the one-cloud manifest "
        "`init` wrote), use --replace"
    )
    if anchor is not None and manifest.version <= anchor.manifest.version:
        raise ManifestInvalid(
            f"{file} is version {manifest.version}; version {anchor.manifest.version} is "
            f"installed: only a newer version can follow it; {switch_hint}"
        )
    floor = anchor.manifest.version if anchor is not None else 0
    chain = [p for p in _read_all(previous_paths) if floor < p.manifest.version < manifest.version]
    try:
        verify_chain([*chain, signed], trusted=anchor)
    except ManifestInvalid as exc:
        hint = [switch_hint] if anchor is not None else []
        raise ManifestInvalid(str(exc), problems=[*exc.problems, *hint]) from None
    if manifest.deployment != config.deployment:
        raise ManifestInvalid(
            f"{file} is a manifest of deployment {manifest.deployment!r}; this coordinator "
            f"serves {config.deployment!r}"
        )
    entry = manifest.entry(config.cloud)
    own_key = public_key_text(key.verify_key)
    if entry is None:
        raise ManifestInvalid(
            f"{file} does not list this coordinator's cloud {config.cloud}; it lists "
            f"{', '.join(manifest.cloud_ids())}"
        )
    if entry.public_key != own_key:
        raise ManifestInvalid(
            f"{file} lists key {entry.public_key} for cloud {config.cloud}, but this "
            f"coordinator's key ({obj.state_dir / KEY_NAME}) is {own_key}; when rotating, "
            "replace the key file first"
        )
    weights = _genesis_weights(obj, manifest, genesis_weights_path)
    federation_genesis(manifest, weights)
    if manifest.model_spec != config.model:
        raise ConfigError(
            f"the model spec in {obj.state_dir / 'coordinator.toml'} differs from the "
            f"manifest's; set [model] to: {msgspec.json.encode(manifest.model_spec).decode()}"
        )
    if anchor is None:
        _check_store_genesis(obj, config, manifest)
    if weights is not None and genesis_weights_path is not None:
        install_genesis_weights(obj.state_dir, weights)
    write_manifest_file(path, signed, mode=0o640)
    _echo_installed(path, signed, as_json, already=False)


def _check_store_genesis(obj: Context, config: CoordinatorConfig, manifest: Manifest) -> None:
    """A coordinator that has served rounds cannot move its history to another genesis."""
    with obj.store(config) as store:
        models = store.list_models()
    if models and models[0].digest != manifest.genesis_digest:
        raise ManifestInvalid(
            f"the store already holds {len(models)} model(s) grown from genesis "
            f"{models[0].digest[:16]}..., not this manifest's genesis "
            f"{manifest.genesis_digest[:16]}...: join with a fresh store (another --db)"
        )


def _echo_installed(path: Path, signed: SignedManifest, as_json: bool, *, already: bool) -> None:
    manifest = signed.manifest
    if as_json:
        echo_json(
            {
                "installed": str(path),
                "already_installed": already,
                "version": manifest.version,
                "digest": manifest_digest(manifest),
                "tolerance": tolerance_text(len(manifest.clouds)),
            }
        )
        return
    what = "already installed" if already else "installed"
    click.echo(f"{what}: version {manifest.version} of deployment {manifest.deployment}")
    click.echo(f"  file:       {path}")
    click.echo(f"  digest:     {manifest_digest(manifest)}")
    click.echo(f"  federation: {tolerance_text(len(manifest.clouds))}")
