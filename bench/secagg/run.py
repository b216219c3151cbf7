"""SecAgg benchmark: fedgate's SecAgg+ next to Flower's, per stage, in one run.

    make bench-secagg                          # full grid, about 5 minutes
    make bench-secagg BENCH_ARGS=--quick       # N in {10, 50}, d in {10k, 100k}

Run from the repository root as a module (``-m``), so that ``bench.secagg`` imports resolve
the same way for Python and for mypy. Prints tables and writes ``out/bench/secagg.png``.
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

from fedgate_common.text_table import format_table

from bench.secagg.fedgate_side import (
    STAGES as FEDGATE_STAGES,
)
from bench.secagg.fedgate_side import (
    fedgate_agent_mask_encode_seconds,
    fedgate_round,
    mask_expansion_throughput,
)
from bench.secagg.flower_side import (
    STAGES as FLOWER_STAGES,
)
from bench.secagg.flower_side import (
    default_threshold,
    flower_agent_mask_encode_seconds,
    flower_round,
)

FULL_N = (10, 50, 100, 200)
FULL_D = (10_000, 100_000, 1_000_000)
QUICK_N = (10, 50)
QUICK_D = (10_000, 100_000)
FLOWER_SHORT = {
    "setup": "setup",
    "share_keys": "share",
    "collect_masked_vectors": "mask",
    "unmask": "unmask",
}
Row = list[float | int | str]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N in {10, 50}, d in {10k, 100k}")
    parser.add_argument("--k", type=int, default=20, help="neighbours per agent (default 20)")
    parser.add_argument("--dropout", type=float, default=0.0, help="fraction dropped after shares")
    parser.add_argument("--out", type=Path, default=Path("out/bench"))
    args = parser.parse_args()
    ns, ds = (QUICK_N, QUICK_D) if args.quick else (FULL_N, FULL_D)
    started = time.perf_counter()

    fedgate_rows: list[Row] = []
    flower_rows: list[Row] = []
    ratio_rows: list[Row] = []
    plot: dict[str, list[tuple[int, int, float]]] = {"fedgate": [], "flower": []}
    for n, d in itertools.product(ns, ds):
        ours = fedgate_round(n, d, args.k, dropout_fraction=args.dropout)
        theirs = flower_round(
            n, d, args.k, default_threshold(n, args.k), dropout_fraction=args.dropout
        )
        ours_row: Row = [n, d, ours.degree, ours.threshold, ours.dropped, ours.encode_seconds]
        ours_row += [ours.agent.get(s, 0.0) for s in FEDGATE_STAGES]
        ours_row += [ours.coordinator.get(s, 0.0) for s in FEDGATE_STAGES]
        ours_row += [ours.bytes_up_per_agent, ours.bytes_down_per_agent]
        fedgate_rows.append(ours_row)
        their_row: Row = [n, d, theirs.neighbours, default_threshold(n, args.k), theirs.dropped]
        their_row += [theirs.agent[s] for s in FLOWER_STAGES]
        their_row += [theirs.coordinator[s] for s in FLOWER_STAGES]
        their_row += [theirs.bytes_up_per_agent, theirs.bytes_down_per_agent]
        flower_rows.append(their_row)
        ours_agent = ours.encode_seconds + sum(ours.agent.values())
        ours_coord = sum(ours.coordinator.values())
        ratio_rows.append(
            [
                n,
                d,
                sum(theirs.agent.values()) / ours_agent,
                sum(theirs.coordinator.values()) / ours_coord,
                theirs.bytes_up_per_agent / ours.bytes_up_per_agent,
                ours.bytes_up_per_agent / d,
                theirs.bytes_up_per_agent / d,
            ]
        )
        plot["fedgate"].append((n, d, ours_coord))
        plot["flower"].append((n, d, sum(theirs.coordinator.values())))
        print(f"  done N={n} d={d} ({time.perf_counter() - started:.0f} s)", flush=True)

    stage_cols = [f"agent {s} s" for s in FEDGATE_STAGES] + [f"coord {s} s" for s in FEDGATE_STAGES]
    print("\nfedgate SecAgg+ (16-bit words), one round; agent = median agent, seconds")
    print(
        format_table(
            [
                "N",
                "d",
                "k",
                "t",
                "drop",
                "agent encode s",
                *stage_cols,
                "up B/agent",
                "down B/agent",
            ],
            fedgate_rows,
        )
    )
    flower_cols = [f"agent {FLOWER_SHORT[s]} s" for s in FLOWER_STAGES] + [
        f"coord {FLOWER_SHORT[s]} s" for s in FLOWER_STAGES
    ]
    print("\nFlower SecAgg+ (flwr 1.42.0), one round, seconds")
    print(
        format_table(
            ["N", "d", "k", "t", "drop", *flower_cols, "up B/agent", "down B/agent"], flower_rows
        )
    )
    print("\nRatios (Flower / fedgate; > 1 means fedgate is faster or smaller)")
    print(
        format_table(
            ["N", "d", "agent time", "coord time", "bytes up", "fedgate B/param", "Flower B/param"],
            ratio_rows,
        )
    )

    d_max = max(ds)
    target: list[Row] = []
    flower_seconds = flower_agent_mask_encode_seconds(d_max, args.k, repeats=5)
    for bits in (16, 32):
        ours_seconds = fedgate_agent_mask_encode_seconds(d_max, args.k, word_bits=bits)
        target.append(
            [bits, d_max, args.k, ours_seconds, flower_seconds, flower_seconds / ours_seconds]
        )
    print("\nAgent masking + encoding, one agent (target: Flower / fedgate >= 5)")
    print(format_table(["word bits", "d", "k", "fedgate s", "Flower s", "ratio"], target))

    throughput: list[Row] = []
    for bits in (16, 32):
        masks, raw = mask_expansion_throughput(d_max, args.k, bits)
        throughput.append([bits, raw / 1e9, masks / 1e9, masks / raw])
    print("\nMask expansion vs raw AES-256-CTR keystream, same machine, same run (target >= 0.5)")
    print(format_table(["word bits", "raw AES-CTR GB/s", "masks GB/s", "ratio"], throughput))

    png = write_plot(args.out, plot, ratio_rows, ns, ds)
    print(f"\nplot: {png}\ntotal {time.perf_counter() - started:.0f} s")


def write_plot(
    out: Path,
    coordinator: dict[str, list[tuple[int, int, float]]],
    ratios: list[Row],
    ns: tuple[int, ...],
    ds: tuple[int, ...],
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    d_max = max(ds)
    for name, style in (("fedgate", "o-"), ("flower", "s--")):
        points = [(n, s) for n, d, s in coordinator[name] if d == d_max]
        left.plot([p[0] for p in points], [p[1] for p in points], style, label=name)
    left.set_xlabel("agents N")
    left.set_ylabel("coordinator seconds per round")
    left.set_title(f"coordinator work, d = {d_max:,}")
    left.set_yscale("log")
    left.legend()
    for d in ds:
        points = [(int(r[0]), float(r[2])) for r in ratios if r[1] == d]
        right.plot([p[0] for p in points], [p[1] for p in points], "o-", label=f"d = {d:,}")
    right.axhline(1.0, color="grey", linewidth=0.8)
    right.set_xlabel("agents N")
    right.set_ylabel("Flower / fedgate agent time")
    right.set_title("agent time per round, ratio")
    right.legend()
    figure.tight_layout()
    path = out / "secagg.png"
    figure.savefig(path, dpi=110)
    return path


if __name__ == "__main__":
    main()
