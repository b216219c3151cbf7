"""``fedgate-agent pretrain RUNS_FILE... --out FILE``: pre-train a federation's genesis
model on simulated plant runs into a genesis-weights file.

The output file and the model spec are checked before torch loads, every runs file and
its fit with the spec before training starts. Progress goes to stderr, the result to
stdout. The training itself is :mod:`fedgate_agent.pretraining`.
"""

from __future__ import annotations

import math
import os
import secrets
import time
from pathlib import Path
from typing import Any

import click
import msgspec
from fedgate_common.errors import FedgateError, PlantRunsInvalid
from fedgate_common.genesis_weights import genesis_weights_digest, write_genesis_weights
from fedgate_common.model_spec import DEFAULT_MODEL, ModelSpec

from fedgate_agent.cli_support import ExitCode, echo_json, fail
from fedgate_agent.config import WindowsConfig
from fedgate_agent.errors import ConfigError, TrainingDiverged

__all__ = ["pretrain_command"]

# Those of fedgate_agent.pretraining and .training, which load torch (a test compares them).
DEFAULT_EPOCHS = 2
MAX_EPOCHS = 1_000
# The windows a site's agent cuts from its buffer by default (windows.stride).
DEFAULT_STRIDE = WindowsConfig().stride


def read_model_spec(path: Path) -> ModelSpec:
    """The model spec in JSON file ``path`` (what ``fedgate-coordinator init --model-spec``
    takes); :class:`ConfigError` if unreadable or invalid."""
    try:
        return msgspec.json.decode(path.read_bytes(), type=ModelSpec)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the model spec: {exc.strerror}") from None
    except (msgspec.DecodeError, ValueError, FedgateError) as exc:
        raise ConfigError(f"{path}: not a valid model spec: {exc}") from None


def _unwritable(path: Path) -> str:
    """Why ``path`` cannot be created ("" if it can): checked before training."""
    ancestor = path.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return f"{ancestor} is not a directory"
    if not os.access(ancestor, os.W_OK | os.X_OK):
        return f"directory {ancestor} is not writable"
    return ""


def _training_warnings(spec: ModelSpec, losses: list[float]) -> list[str]:
    guessing = math.log(spec.n_classes)
    if not losses or spec.n_classes < 2 or losses[-1] < 0.9 * guessing:
        return []
    return [
        f"the model learned little: last loss {losses[-1]:.3f}, guessing gives "
        f"ln {spec.n_classes} = {guessing:.3f}; check that the model spec's feature_mean "
        "and feature_scale suit the runs (the default spec has none)"
    ]


@click.command("pretrain")
@click.argument(
    "runs_files",
    nargs=-1,
    required=True,
    metavar="RUNS_FILE...",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
)
@click.option(
    "--out",
    "out_file",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Genesis-weights file to write.",
)
@click.option(
    "--model-spec",
    "model_spec_file",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None,
    help="JSON file with the model spec, as for `fedgate-coordinator init --model-spec` "
    "(default: TEP 1-D CNN, 52 tags x 20 samples, 22 classes).",
)
@click.option(
    "--seed",
    type=click.IntRange(0, 2**63 - 1),
    default=None,
    help="Seed of the random weights training starts from and of the shuffling "
    "(default: fresh randomness; printed).",
)
@click.option(
    "--epochs",
    type=click.IntRange(1, MAX_EPOCHS),
    default=DEFAULT_EPOCHS,
    show_default=True,
    help="Passes over the windows.",
)
@click.option(
    "--stride",
    type=click.IntRange(1, 100_000),
    default=DEFAULT_STRIDE,
    show_default=True,
    help="Samples between window starts (default: the agent's windows.stride default); "
    "2 halves the windows and the time.",
)
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def pretrain_command(
    runs_files: tuple[Path, ...],
    out_file: Path,
    model_spec_file: Path | None,
    seed: int | None,
    epochs: int,
    stride: int,
    force: bool,
    as_json: bool,
) -> None:
    """Pre-train a federation's genesis model on simulated plant runs (public data).

    RUNS_FILE: files of `fedgate-bridge simulate-runs`. The random genesis weights of
    --seed (those `fedgate-coordinator federation init --genesis-seed` would draw) are
    trained with plain SGD (lr 0.01, momentum 0.9, batch 32; no DP: nothing in the runs
    comes from a site) on the runs' windows of one label. The file written names the
    model spec, the seed, the SHA-256 of every runs file and the settings. Give it to
    every coordinator with --genesis-weights: the manifest pins its digest. Training
    uses one CPU thread, so the same files, spec, seed and options give the same digest
    again (with the same torch build). Progress per epoch goes to stderr; an epoch over
    3 simulated sets (28,168 windows at stride 1) takes about 6 s on one x86 core.
    A warning says when the loss stayed near guessing: the model spec's feature_mean
    and feature_scale must suit the runs (the default spec has none).

    \b
    Examples:
      fedgate-agent pretrain runs-1.npz runs-2.npz runs-3.npz --out genesis.msgpack
      fedgate-agent pretrain runs-*.npz --model-spec spec.json --seed 7 --epochs 2 \\
          --out genesis.msgpack --json

    \b
    Exit codes:
      0 success            1 unexpected failure, or interrupted (nothing written)
      2 bad command line (a RUNS_FILE or --model-spec missing, an option out of range)
      3 --model-spec is not a valid model spec, or --out cannot be written
      4 a runs file is unreadable or inconsistent, does not fit the model spec (feature
        count, a label beyond its classes), or gives no window
      5 --out exists (pass --force to replace it)
    """
    if out_file.exists() and not force:
        fail(f"{out_file} exists; pass --force to replace it", ExitCode.CONFLICT)
    if any(out_file.resolve() == path.resolve() for path in runs_files):
        fail(f"--out {out_file} is one of the runs files", ExitCode.USAGE)
    problem = _unwritable(out_file)
    if problem:
        fail(f"--out {out_file}: {problem}", ExitCode.CONFIG)
    try:
        spec = DEFAULT_MODEL if model_spec_file is None else read_model_spec(model_spec_file)
    except ConfigError as exc:
        fail(str(exc), ExitCode.CONFIG)
    if seed is None:
        seed = secrets.randbits(63)

    from fedgate_agent import pretraining  # torch loads here, after the checks above

    losses: list[float] = []

    def show(progress: pretraining.EpochProgress) -> None:
        losses.append(progress.mean_loss)
        click.echo(
            f"epoch {progress.epoch}/{progress.epochs}: loss {progress.mean_loss:.4f} "
            f"({progress.seconds:.1f} s)",
            err=True,
        )

    started = time.perf_counter()
    try:
        public = pretraining.read_public_runs(runs_files)
        pretraining.check_public_runs(public, spec, stride=stride, epochs=epochs)
        runs = sum(len(file_runs) for file_runs in public.runs)
        click.echo(
            f"pre-training from seed {seed} on {runs} runs of {len(runs_files)} file(s), "
            f"windows of {spec.window} every {stride} sample(s), {epochs} epoch(s)",
            err=True,
        )
        genesis = pretraining.pretrain_genesis(
            spec, public, seed=seed, epochs=epochs, stride=stride, progress=show
        )
    except (PlantRunsInvalid, pretraining.PretrainingRefused, TrainingDiverged) as exc:
        fail(str(exc), ExitCode.DATA)
    try:
        write_genesis_weights(out_file, genesis)
    except OSError as exc:
        fail(f"cannot write {out_file}: {exc.strerror}", ExitCode.CONFIG)
    provenance = genesis.pretraining
    warnings = _training_warnings(spec, losses)
    for warning in warnings:
        click.echo(f"warning: {warning}", err=True)
    result: dict[str, Any] = {
        "file": str(out_file),
        "digest": genesis_weights_digest(genesis),
        "seed": seed,
        "runs": provenance.runs,
        "runs_files": [str(path) for path in runs_files],
        "runs_sha256": list(provenance.runs_sha256),
        "windows": provenance.windows,
        "window": spec.window,
        "stride": stride,
        "epochs": epochs,
        "epoch_losses": losses,
        "seconds": round(time.perf_counter() - started, 1),
        "created_at": provenance.created_at,
        "warnings": warnings,
    }
    if as_json:
        echo_json(result)
        return
    click.echo(f"genesis weights  {out_file}")
    click.echo(f"digest           {result['digest']}")
    click.echo(f"seed             {seed}")
    click.echo(f"runs             {provenance.runs} from {len(runs_files)} file(s)")
    click.echo(f"windows          {provenance.windows:,} (window {spec.window}, stride {stride})")
    click.echo(
        f"training         {epochs} epoch(s), last loss {losses[-1]:.4f}, {result['seconds']:.0f} s"
    )
    click.echo("Next: start the federation from it (every coordinator needs this file):")
    click.echo(f"  fedgate-coordinator federation init --genesis-weights {out_file} ...")
