"""Record-level DP with the sites' noise pooled: what the demo would reach at ε = 3 if the
Gaussian noise of DP-SGD were added once to a secure sum instead of once per site.

The product does this with ``privacy.record_noise = "pooled"`` (docs/privacy.md §3.7);
this is the same training in one process, to compare topologies. With local noise every
agent adds the whole noise σ·C to its own steps, so the averaged update of n sites carries
the noise of n independent runs. With each step's clipped gradients summed through secure
aggregation and every agent adding only a share of the noise (one step per round, the sum
released to the coordinator), the released sum carries σ·C once per group that is
summed. Over the union of the sites' windows with Poisson sampling at the same rate, that
is central DP-SGD, trained here with the noise multiplied by ``--factors``:

- 1: one secure sum over all sites (the most the pooling can give);
- 2: the demo's topology, one secure sum per cloud of 3 sites, 4 clouds: the global step
  carries 4 independent noises, twice the standard deviation;
- 2.449: the same, with each share sized so that 2 of a cloud's 3 sites still give σ
  (the worst dropout its secure aggregation tolerates): √1.5 more;
- 3.464 = √12: as much noise as the 12 sites' own noise averaged; the federated demo with
  local steps (0.681) sits below it.

Each row accounts ε at σ (the factor only adds noise). Usage (make demo caches the genesis)::

    .venv/bin/python -m bench.privacy.pooled_noise \\
        --genesis-weights out/cache/genesis-seed1-sets3-<spec>.msgpack

One DP-SGD step a round (what a pooled mechanism can release per secure sum), as the
product's pooled mode and ``make demo DEMO_ARGS="--record-noise pooled"`` train it:
``--site-batch 1000 --local-epochs 1 --rounds 40 --learning-rate 3 --lr-decay 1
--server-momentum 0.8 --factors 2.449`` (sampling rate 0.70, heavy-ball momentum on the
decided models as the manifest's ``server_momentum`` gives it). ``--factors 0`` trains the
same steps without noise.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from fedgate_agent.datasets.tep import centralized_dataset, federated_split
from fedgate_agent.model import build_model, load_weights, weights_of
from fedgate_agent.private_training import train_locally_private
from fedgate_agent.record_privacy import (
    RoundSpend,
    epsilon,
    noise_multiplier_for,
    sample_rate,
    steps_per_round,
)
from fedgate_common.text_table import format_table

from bench.privacy.federation import (
    RecordDp,
    memoize_accountant,
    quiet_opacus,
    score,
    site_seed,
    training_plan,
)
from bench.privacy.public_pretraining import load_pretrained

DEMO_SITES = 12
SITE_BATCH = 256  # the demo's DP plan: batch 256 on every site, so 12 x 256 in one step


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--genesis-weights", type=Path, required=True)
    parser.add_argument("--factors", type=float, nargs="+", default=[1.0, 2.0, 2.449, 3.464])
    parser.add_argument("--epsilon", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--site-batch", type=int, default=SITE_BATCH)
    parser.add_argument("--local-epochs", type=int, default=2)
    parser.add_argument("--learning-rate", type=float, default=1.0)
    parser.add_argument("--lr-decay", type=float, default=0.9)
    parser.add_argument(
        "--server-momentum",
        type=float,
        default=0.0,
        help="heavy-ball momentum across rounds (w += step + β·(w − w_prev)); the optimizer "
        "inside a round starts afresh, so with one step a round this is the only momentum",
    )
    parser.add_argument(
        "--clip",
        type=float,
        default=1.0,
        help="per-window clip norm C (the noise is σ·C; the step moves by at most lr·C)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    quiet_opacus()
    memoize_accountant()
    split = federated_split(DEMO_SITES, stride=1)
    union = centralized_dataset(split)
    initial = load_pretrained(args.genesis_weights, split.spec)
    # The demo's DP plan (lr 1, decay 0.9, momentum 0.9, 2 epochs, C = 1), every site's
    # batch in one step.
    plan = training_plan(
        learning_rate=args.learning_rate,
        lr_decay=args.lr_decay,
        momentum=0.9,
        local_epochs=args.local_epochs,
        batch_size=DEMO_SITES * args.site_batch,
    )
    dp = RecordDp(args.epsilon, max_grad_norm=args.clip)
    settings = dp.settings(args.rounds)
    rate = sample_rate(len(union), plan.batch_size)
    steps = steps_per_round(len(union), plan.batch_size, plan.local_epochs)
    sigma = noise_multiplier_for(settings, sample_rate=rate, steps=steps)
    print(f"{len(union)} windows, sample rate {rate:.4f}, {steps} steps a round, σ {sigma:.3f}")
    rows = []
    for factor in args.factors:
        started = time.perf_counter()
        model = build_model(split.spec, weights=initial)
        history: list[RoundSpend] = []
        previous = weights_of(model)
        for round_number in range(1, args.rounds + 1):
            before = weights_of(model)
            trained = train_locally_private(
                model,
                union,
                plan.plan_for(round_number),
                noise_multiplier=sigma * factor,
                max_grad_norm=dp.max_grad_norm,
                seed=site_seed(args.seed, round_number, 99),
            )
            if args.server_momentum:
                after = weights_of(model)
                load_weights(
                    model,
                    {
                        name: after[name] + args.server_momentum * (before[name] - previous[name])
                        for name in after
                    },
                )
            previous = before
            history.append(
                RoundSpend(
                    round=round_number,
                    noise_multiplier=sigma,
                    sample_rate=trained.sample_rate,
                    steps=trained.steps,
                )
            )
        accuracy, _ = score(split, weights_of(model))
        spent = epsilon(history, settings.delta, accountant=settings.accountant)
        seconds = time.perf_counter() - started
        rows.append([f"{factor:g}", f"{sigma * factor:.3f}", f"{spent:.3f}", f"{accuracy:.4f}"])
        print(f"factor {factor:g}: {accuracy:.4f} at ε {spent:.3f} ({seconds:.0f} s)", flush=True)
    print(format_table(["noise factor", "σ trained", "ε (at σ)", "accuracy"], rows))


if __name__ == "__main__":
    main()
