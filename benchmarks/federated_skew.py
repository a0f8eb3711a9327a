"""Part 7's non-IID grid at full size: FedAvg and FedAvgM on IID, Dirichlet 0.1 and by-label splits, 3 seeds.

The notebook runs the same grid on 5,000 digits (about 50 s of CPU); this script runs it on 10,000 digits, the
size of the reviews' evidence (FL review 15-17, dispositions M7), and adds client sampling at equal client
work on every seed: McMahan's C = 0.5 for 2R rounds against C = 1 for R rounds (each sampled owner trains a
full local epoch, so both do the same total work).

Ten simulated owners, the MLP 784-500-10, one local epoch per round (SGD, lr 0.05, momentum 0.5, batch 32),
FedAvgM with server momentum 0.9 (Hsu et al., 2019). A seed sets the partition, the initial model, the
shuffles and the sampling. Everything runs in this process through ``scale.Federation`` with
``scale.local_trainer`` (no syft): a simulation, as in the notebook's section 3.

Usage, from the repository root::

    SECURE_AI_DATA=/path/with/MNIST .venv/bin/python benchmarks/federated_skew.py [--digits 10000]

Printed on the shared 2-core machine (2026-12-05; the accuracies do not depend on the load)::

    10 owners, 10,000 digits, 6 rounds, seeds 0-2; accuracy in %, differences in points:
    mean [min, max] over seeds

    split          FedAvg (seeds 0/1/2)    FedAvgM - FedAvg
    IID            92.93 / 92.88 / 92.71   -0.10 [-0.23, +0.05]
    Dirichlet 0.1  84.89 / 88.76 / 84.17   +3.56 [+1.51, +5.72]
    by label       84.04 / 85.40 / 84.67   +1.97 [+1.11, +2.90]

    split          IID - split, FedAvg     IID - split, FedAvgM    C=0.5 x 2R - C=1 x R
    Dirichlet 0.1  +6.90 [+4.12, +8.54]    +3.24 [+2.66, +4.35]    -3.56 [-5.31, -0.69]
    by label       +8.14 [+7.48, +8.89]    +6.07 [+5.03, +6.76]    -6.65 [-10.75, -4.31]

    199 s wall, 81 s CPU; load average 6.4
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tutorials"))

import numpy as np  # noqa: E402
from secure_ai import data, runtime, scale  # noqa: E402
from secure_ai import federated as fl  # noqa: E402
from secure_ai import training as tr  # noqa: E402

RECIPE = {"model": "mlp", "lr": 0.05, "momentum": 0.5, "batch_size": 32}
SPLITS = ("IID", "Dirichlet 0.1", "by label")


def final_accuracy(x, y, parts, seed: int, rounds: int, test, **options) -> float:
    """Test accuracy after ``rounds`` rounds of ``scale.Federation`` over simulated owners."""
    trainers = {f"owner {i}": scale.local_trainer(scale.train_local_epoch, x[p], y[p])
                for i, p in enumerate(parts)}
    federation = scale.Federation(trainers, seed=seed, concurrent=False, **options)
    tr.set_seed(seed)
    history, _ = fl.run_rounds(tr.MLP(), rounds, federation.step(RECIPE, seed=seed), test, progress=False)
    return 100 * history[-1]


def partitions(y, owners: int, seed: int) -> dict:
    return {"IID": data.partition_iid(len(y), owners, seed=seed),
            "Dirichlet 0.1": data.partition_dirichlet(y, owners, alpha=0.1, seed=seed),
            "by label": data.partition_by_label(y, owners, shards_per_owner=2, seed=seed)}


def spread(values) -> str:
    return f"{np.mean(values):+.2f} [{min(values):+.2f}, {max(values):+.2f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--digits", type=int, default=10_000)
    parser.add_argument("--owners", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    runtime.configure()
    images, labels = data.mnist_raw(train=True)
    test = data.mnist_tensors(train=False)
    idx = np.sort(np.random.default_rng(0).choice(len(labels), args.digits, replace=False))
    x, y = images[idx], labels[idx]
    seeds = range(args.seeds)
    acc: dict[tuple, float] = {}
    tic, cpu = time.perf_counter(), time.process_time()
    for seed in seeds:
        for split, parts in partitions(y, args.owners, seed).items():
            common = (x, y, parts, seed)
            acc["FedAvg", split, seed] = final_accuracy(*common, args.rounds, test)
            acc["FedAvgM", split, seed] = final_accuracy(*common, args.rounds, test, server_momentum=0.9)
            if split != "IID":
                acc["C = 0.5", split, seed] = final_accuracy(*common, 2 * args.rounds, test, fraction=0.5)
        print(f"  seed {seed} done", flush=True)
    print(f"\n{args.owners} owners, {args.digits:,} digits, {args.rounds} rounds, seeds 0-{args.seeds - 1}; "
          "accuracy in %, differences in points:\nmean [min, max] over seeds\n")
    print(f"{'split':<14} {'FedAvg (seeds ' + '/'.join(map(str, seeds)) + ')':<23} FedAvgM - FedAvg")
    for split in SPLITS:
        fedavg = " / ".join(f"{acc['FedAvg', split, s]:.2f}" for s in seeds)
        gain = spread([acc["FedAvgM", split, s] - acc["FedAvg", split, s] for s in seeds])
        print(f"{split:<14} {fedavg:<23} {gain}")
    print(f"\n{'split':<14} {'IID - split, FedAvg':<23} {'IID - split, FedAvgM':<23} C=0.5 x 2R - C=1 x R")
    for split in SPLITS[1:]:
        gaps = [spread([acc[m, "IID", s] - acc[m, split, s] for s in seeds]) for m in ("FedAvg", "FedAvgM")]
        sampling = spread([acc["C = 0.5", split, s] - acc["FedAvg", split, s] for s in seeds])
        print(f"{split:<14} {gaps[0]:<23} {gaps[1]:<23} {sampling}")
    print(f"\n{time.perf_counter() - tic:.0f} s wall, {time.process_time() - cpu:.0f} s CPU; load average "
          f"{os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
