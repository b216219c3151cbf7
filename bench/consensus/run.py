"""Consensus benchmark: decision latency and federation traffic per decision on loopback.

    .venv/bin/python -m bench.consensus.run                      # M in {1, 4, 7, 10}, 10 heights
    .venv/bin/python -m bench.consensus.run --clouds 4 --heights 3 --small

For each M: no faults, then f = ⌊(M − 1)/3⌋ silent coordinators. Run from the repository
root as a module. Prints one table on stdout (progress on stderr); ``--json-out`` also writes
it as JSON (default path ``bench/consensus/results.json``). See bench/consensus/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec
from fedgate_common.consensus.manifest import ConsensusParams
from fedgate_common.model_spec import DEFAULT_MODEL, ModelSpec, parameter_count
from fedgate_common.text_table import format_table

from bench.consensus.scenario import (
    KINDS,
    LOOPBACK_CONSENSUS,
    ScenarioResult,
    run_scenario,
    scenarios,
)

SMALL_MODEL = ModelSpec(n_features=3, window=8, n_classes=2, channels=4)
DEFAULT_JSON = Path("bench/consensus/results.json")
HEADERS = (
    "M",
    "faulty",
    "quorum",
    "heights",
    "latency p50 ms",
    "latency max ms",
    "mean rounds",
    "CPU ms",
    "msgs/decision",
    "KB/decision",
    "KB votes",
    "KB proposals",
    "KB aggregates",
    "KB models",
)


def table_row(result: ScenarioResult) -> list[str]:
    """One table line, numbers already formatted (see :func:`right_aligned`)."""
    return [
        str(result.clouds),
        str(result.faulty),
        str(result.quorum),
        str(result.heights),
        f"{result.latency_p50_ms():.0f}",
        f"{result.latency_max_ms():.0f}",
        f"{result.mean_rounds():.2f}",
        f"{result.cpu_ms_per_decision():.0f}",
        f"{result.messages_per_decision():.1f}",
        f"{result.kb_per_decision():.1f}",
        *(f"{result.kb_per_decision(kind):.1f}" for kind in KINDS),
    ]


def right_aligned(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[list[str]]:
    """Pad every cell to its column's width on the left: format_table left-aligns text."""
    widths = [max([len(h), *(len(row[i]) for row in rows)]) for i, h in enumerate(headers)]
    return [[cell.rjust(width) for cell, width in zip(row, widths, strict=True)] for row in rows]


def result_json(result: ScenarioResult) -> dict[str, Any]:
    return {
        "clouds": result.clouds,
        "faulty": result.faulty,
        "silent": list(result.silent),
        "quorum": result.quorum,
        "heights": result.heights,
        "latency_p50_ms": round(result.latency_p50_ms(), 1),
        "latency_max_ms": round(result.latency_max_ms(), 1),
        "mean_rounds": round(result.mean_rounds(), 3),
        "cpu_ms_per_decision": round(result.cpu_ms_per_decision(), 1),
        "messages_per_decision": round(result.messages_per_decision(), 2),
        "kb_per_decision": round(result.kb_per_decision(), 2),
        "messages_per_decision_by_kind": {
            kind: round(result.messages_per_decision(kind), 2) for kind in KINDS
        },
        "kb_per_decision_by_kind": {kind: round(result.kb_per_decision(kind), 2) for kind in KINDS},
        "samples": msgspec.to_builtins(result.samples),
    }


def setup_text(spec: ModelSpec, consensus: ConsensusParams, heights: int) -> str:
    return (
        f"model {parameter_count(spec)} float32 parameters; {heights} heights per row; "
        f"timeouts propose {consensus.timeout_propose_s:g} s, prevote "
        f"{consensus.timeout_prevote_s:g} s, precommit {consensus.timeout_precommit_s:g} s, "
        f"+{consensus.timeout_delta_s:g} s per round, aggregate_wait "
        f"{consensus.aggregate_wait_s:g} s; rule {consensus.rule}; "
        f"{os.cpu_count()} CPU cores, one process, one event loop"
    )


def load_text() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f}"


def progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


async def run_all(args: argparse.Namespace, spec: ModelSpec) -> list[ScenarioResult]:
    results: list[ScenarioResult] = []
    for scenario in scenarios(args.clouds, args.placement):
        started = time.perf_counter()
        progress(f"{scenario.label}: starting ({', '.join(scenario.honest)} honest)")
        result = await run_scenario(
            scenario,
            heights=args.heights,
            spec=spec,
            consensus=LOOPBACK_CONSENSUS,
            seed=args.seed,
            height_timeout_s=args.height_timeout,
            progress=progress,
        )
        progress(
            f"{scenario.label}: done in {time.perf_counter() - started:.1f} s, "
            "all honest clouds decided the same models"
        )
        results.append(result)
    return results


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--clouds", type=int, nargs="+", default=[1, 4, 7, 10], help="values of M (1 4 7 10)"
    )
    parser.add_argument("--heights", type=int, default=10, help="heights per row (default 10)")
    parser.add_argument(
        "--small", action="store_true", help=f"tiny model ({parameter_count(SMALL_MODEL)} params)"
    )
    parser.add_argument(
        "--placement",
        choices=("spread", "last"),
        default="spread",
        help="silent clouds spread over the rotation (default) or the last f",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random aggregates")
    parser.add_argument(
        "--height-timeout", type=float, default=120.0, help="give up on a height after (s)"
    )
    parser.add_argument(
        "--json-out",
        type=Path,
        nargs="?",
        const=DEFAULT_JSON,
        default=None,
        help=f"also write the results as JSON (default path {DEFAULT_JSON})",
    )
    parser.add_argument("--verbose", action="store_true", help="log the coordinators at INFO")
    args = parser.parse_args(argv)
    if args.heights < 1 or any(m < 1 for m in args.clouds):
        parser.error("--heights and every --clouds value must be at least 1")
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        stream=sys.stderr,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    spec = SMALL_MODEL if args.small else DEFAULT_MODEL
    load_before = load_text()
    progress(f"{load_before} before the run")
    results = asyncio.run(run_all(args, spec))
    load_after = load_text()
    rows = right_aligned(HEADERS, [table_row(r) for r in results])
    setup = setup_text(spec, LOOPBACK_CONSENSUS, args.heights)
    print(setup)
    print(f"{load_before} before, {load_after} after the run")
    print(format_table(HEADERS, rows))
    if args.json_out is not None:
        document = {
            "setup": setup,
            "model_parameters": parameter_count(spec),
            "consensus": msgspec.to_builtins(LOOPBACK_CONSENSUS),
            "placement": args.placement,
            "seed": args.seed,
            "cpu_count": os.cpu_count(),
            "load_before": load_before,
            "load_after": load_after,
            "python": platform.python_version(),
            "rows": [result_json(r) for r in results],
        }
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_bytes(msgspec.json.format(msgspec.json.encode(document)) + b"\n")
        progress(f"wrote {args.json_out}")


if __name__ == "__main__":
    main()
