"""The series' privacy-utility-cost table at full size: Part 6's table with more seeds and shadow models.

Run from the repository root (about 4 minutes on a shared 2-core CPU with the defaults; needs kymatio):

    SECURE_AI_DATA=/path/to/data .venv/bin/python benchmarks/privacy_table.py [--seeds 3] [--shadows 16]

For each seed: gradient inversion (the attack of Part 6, section 1) on batch-1 updates of the original
series' MLP, alone, under DP noise (sigma 1, clip 0.1: epsilon 4.4 for that one step), and averaged over 3
owners (what secure aggregation reveals; CKKS's key holder adds its flooding noise), on --digits digits each,
graded by identification (the
reconstruction is closer to its digit than to every test digit of its class); a crafted model (imprint
weights, Fowl et al. 2022) within Part 2's bounds, one batch of 32 from each of 3 owners, alone, through a
masked sum, through CKKS (weights up to 1,000, above the key holder's flooding noise), under owner-side DP and
DP with masks (Part 6, section 3; benchmarks/malicious_model.py has the details); membership inference (loss
threshold and LiRA with --shadows shadow models for every target, DP or not) against three targets trained on
500 digits: an overfit MLP (no protection), a linear model on ScatterNet features trained with DP-SGD at
epsilon 3 (full-batch steps, Tramer & Boneh's features: it learns as much as the overfit MLP), and the same
linear model trained without DP and stopped at the DP model's test accuracy (utility-matched, so that the
membership columns compare privacy, not how much the model learned); and each protection's time and bytes per
owner and round. The updates are computed in-process: Part 6 shows the same attacks through syft. Prints the
table (mean and range over seeds), the wall time and the peak memory.

Published anchors: DLG (Zhu et al. 2019) rebuilds batch-1 MNIST digits almost exactly; iDLG (Zhao et al.
2020) reads batch-1 labels with 100% accuracy; LiRA (Carlini et al. 2022) reaches 8.4% TPR at 0.1% FPR on
CIFAR-10 with 256 shadow models; any attack on an (eps, delta)-DP training obeys TPR <= e^eps * FPR + delta.
"""
from __future__ import annotations

import argparse
import functools
import resource
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tutorials"))

from secure_ai import aggregator, membership, runtime  # noqa: E402
from secure_ai import attacks as at  # noqa: E402
from secure_ai import costs as cost_model  # noqa: E402
from secure_ai import imprint as im  # noqa: E402
from secure_ai import privacy as dp  # noqa: E402
from secure_ai import training as tr  # noqa: E402
from secure_ai.data import mnist_raw, mnist_tensors  # noqa: E402

DP_EPSILON = 3.0  # the DP membership target: ScatterNet + linear, DP-SGD in 30 full-batch steps
SIGMA, CLIP, OWNERS = 1.0, 0.1, 3
# (row of the table, technique of cost_model.round_costs): the DP row is named for what it is (DP review 5.7)
ROWS = [("plain FedAvg (overfit MLP)", "plain FedAvg"),
        ("DP-SGD (central, 500 digits; update: one DP step)", "FedAvg + DP"),
        ("secure aggregation (masks)", "secure aggregation (masks)"), ("CKKS", "CKKS"),
        ("DP + secure aggregation", "DP + secure aggregation"),
        ("no DP, utility-matched (ScatterNet + linear, stopped early)", None)]


def dp_gradient(model, image, label, generator):
    """One DP-SGD step's gradient on one digit: clipped to CLIP, plus N(0, (SIGMA * CLIP)^2) noise."""
    gradient = at.gradient_of(model, image, label)
    norm = torch.sqrt(sum((g * g).sum() for g in gradient))
    scale = min(1.0, CLIP / (norm.item() + 1e-12))
    return [g * scale + torch.randn(g.shape, generator=generator) * SIGMA * CLIP for g in gradient]


def inversion(model, gradient, images, labels, reference, pool, steps) -> tuple[int, float]:
    """``(digits identified, best PSNR)`` of one gradient-inversion attack (Part 6, section 2)."""
    guess = at.infer_labels(gradient, model, batch_size=len(labels), reference=reference)
    rebuilt = at.invert_gradient(model, gradient, guess, steps=steps, progress=False)
    summary = at.grade_reconstructions(guess, rebuilt, images, labels, *pool).summary
    return summary["identified"], summary["best PSNR"]


def inversion_row(seed, x, y, reference, pool, digits, steps):
    """For each technique's view of the update: ``[digits identified, digits attacked, best PSNR]`` over
    ``digits`` attacks (one digit alone, or the mean of 3 owners' single-digit updates: exact with masks,
    flooded by the key holder with CKKS)."""
    tr.set_seed(seed)
    model = tr.MLP()
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    found = {view: [0, 0, -np.inf] for view in ("alone", "dp", "sum", "ckks", "dp sum")}
    start = tr.model_to_vector(model).numpy().astype(np.float64)

    def attack(view, gradient, idx):
        identified, best = inversion(model, gradient, x[idx], y[idx], reference, pool, steps)
        found[view] = [found[view][0] + identified, found[view][1] + len(idx), max(found[view][2], best)]

    for _ in range(digits):
        idx = torch.from_numpy(rng.choice(len(y), OWNERS, replace=False))
        one = idx[:1]
        attack("alone", at.gradient_of(model, x[one], y[one]), one)
        attack("dp", dp_gradient(model, x[one], y[one], generator), one)
        owners = [at.gradient_of(model, x[i:i + 1], y[i:i + 1]) for i in idx]
        attack("sum", [torch.stack(p).mean(0) for p in zip(*owners)], idx)
        moves = [0.1 * torch.cat([g.reshape(-1) for g in grads]).double().numpy() for grads in owners]
        average = aggregator.ckks_average([start - move for move in moves], [1] * OWNERS)[0]   # flooded
        attack("ckks", at.gradient_from_update(start, average, 0.1, model), idx)
        noisy = [dp_gradient(model, x[i:i + 1], y[i:i + 1], generator) for i in idx]
        attack("dp sum", [torch.stack(p).mean(0) for p in zip(*noisy)], idx)
    return {"plain FedAvg": found["alone"], "FedAvg + DP": found["dp"],
            "secure aggregation (masks)": found["sum"], "CKKS": found["ckks"],
            "DP + secure aggregation": found["dp sum"]}


def imprint_row(seed, images, labels, public):
    """For each technique: ``[digits exact, digits identified, digits attacked]`` of the imprint attack on one
    batch of 32 from each of 3 owners (300 raw digits each, drawn with ``seed``)."""
    order = np.random.default_rng(seed).permutation(len(labels))
    shards = [order[k * 300:(k + 1) * 300] for k in range(OWNERS)]
    owners = [(images[shard], labels[shard]) for shard in shards]
    idx = tr.batch_indices(300, 32, 0, seed)
    digits = np.concatenate([x[idx] for x, _ in owners]), np.concatenate([y[idx] for _, y in owners])
    quiet, loud = im.imprint_model(public[0]), im.imprint_model(public[0], scale=1e-9, gain=1e3)
    step = lambda model, owner: im.one_batch(model, *owner, lr=0.1, batch_size=32, seed=seed)
    noisy = [im.dp_one_batch(quiet, *owner, lr=0.1, batch_size=32, noise_multiplier=SIGMA, max_grad_norm=CLIP,
                             seed=seed) for owner in owners]
    bins = lambda model, after: im.imprint_bins(im.update_gradient(model, after, 0.1))[0]
    one_digit = lambda model, after, gain, tol=0.05: im.imprint_digits(   # the bins the attacker reads as one
        im.update_gradient(model, after, 0.1), one_digit=gain / (32 * OWNERS), tol=tol)
    masked = aggregator.masked_average([step(quiet, owner) for owner in owners], [32] * OWNERS)[0]
    flooded = aggregator.ckks_average([step(loud, owner) for owner in owners], [32] * OWNERS)[0]
    views = {"plain FedAvg": np.concatenate([bins(quiet, step(quiet, owner)) for owner in owners]),
             "FedAvg + DP": np.concatenate([bins(quiet, after) for after in noisy]),
             "secure aggregation (masks)": one_digit(quiet, masked, 1e-2),
             "CKKS": one_digit(loud, flooded, 1e3, tol=0.2),
             "DP + secure aggregation": bins(quiet, aggregator.masked_average(noisy, [32] * OWNERS)[0])}
    graded = {name: im.grade(found, *digits, *public) for name, found in views.items()}
    return {name: [g["exact"], g["identified"], g["digits"]] for name, g in graded.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--shadows", type=int, default=16, help="shadow models per target (DP or not)")
    parser.add_argument("--digits", type=int, default=5, help="digits attacked per technique and seed")
    parser.add_argument("--steps", type=int, default=300, help="inversion steps")
    args = parser.parse_args()
    runtime.configure()
    start = time.perf_counter()
    (x, y), test = mnist_tensors(True), mnist_tensors(False)
    raw, public = mnist_raw(True), mnist_raw(False)
    inversion_epsilon = dp.epsilon_spent([(SIGMA, 1.0, 1)])  # one Gaussian step on one digit
    rows = []
    for seed in range(args.seeds):
        tic = time.perf_counter()
        order = torch.from_numpy(np.random.default_rng(seed).permutation(len(y)))
        pool_x, pool_y = x[order[:1000]], y[order[:1000]]
        attack = functools.partial(membership.attack_membership, images=pool_x, labels=pool_y, test=test,
                                   n_shadows=args.shadows, seed=seed, progress=False)
        plain = attack(membership.overfit_trainer())
        train_dp, state = membership.dp_trainer(DP_EPSILON)
        private = attack(train_dp)
        matched = attack(membership.matched_trainer(private.accuracy, test))
        inverted = inversion_row(seed, x[order[1000:]], y[order[1000:]], test[0][:1000], test, args.digits,
                                 args.steps)
        crafted = imprint_row(seed, *raw, public)
        update = functools.partial(cost_model.local_update, pool_x[:250], pool_y[:250], seed=seed)
        costs = cost_model.round_costs(update, n_samples=250, n_owners=OWNERS)
        for name, technique in ROWS:
            dp_row = technique is not None and "DP" in technique
            if technique is None:
                result, epsilon = matched, np.inf
            else:
                result, epsilon = (private, state["epsilon"]) if dp_row else (plain, np.inf)
            best = max(result.scores, key=lambda a: result.tpr(a, 0.01))
            rows.append({"row": name, "seed": seed, "test accuracy": result.accuracy,
                         "eps (membership model)": epsilon,
                         "MIA AUC": max(result.auc(a) for a in result.scores),
                         "MIA TPR at 1% FPR": result.tpr(best, 0.01),
                         "MIA TPR at 0.1% FPR": result.tpr(best, 0.001),
                         "inverted: identified": inverted[technique][0] if technique else np.nan,
                         "inverted: attacked": inverted[technique][1] if technique else np.nan,
                         "inverted: best PSNR (dB)": inverted[technique][2] if technique else np.nan,
                         "crafted: exact": crafted[technique][0] if technique else np.nan,
                         "crafted: identified": crafted[technique][1] if technique else np.nan,
                         "crafted: attacked": crafted[technique][2] if technique else np.nan,
                         "eps (inverted update)": np.nan if technique is None else
                         inversion_epsilon if dp_row else np.inf,
                         "time vs plain": costs[technique]["time vs plain"] if technique else np.nan,
                         "bytes vs plain": costs[technique]["bytes vs plain"] if technique else np.nan})
        print(f"seed {seed} done in {time.perf_counter() - tic:.0f} s: target accuracy plain "
              f"{plain.accuracy:.3f}, DP {private.accuracy:.3f} (eps {state['epsilon']:.2f}, sigma "
              f"{state['sigma']:.2f}), utility-matched {matched.accuracy:.3f}", flush=True)
    frame = pd.DataFrame(rows).drop(columns="seed")
    table = frame.groupby("row", sort=False).agg(["mean", "min", "max"])
    pd.set_option("display.width", 250)
    pd.set_option("display.max_columns", 40)
    pd.set_option("display.max_colwidth", 60)
    print(f"\nPrivacy-utility-cost table: {args.seeds} seeds, {args.shadows} shadow models for every target, "
          f"{args.digits} attacked digits per technique and seed; membership targets trained on 500 MNIST "
          "digits (plain: overfit MLP; DP: ScatterNet + linear, DP-SGD, 30 full-batch steps, clip 1); "
          f"inverted update: one step at sigma {SIGMA}, clip {CLIP}; crafted model: imprint weights, one "
          f"batch of 32 from each of {OWNERS} owners; mean [min, max] over seeds\n")
    means = table.xs("mean", axis=1, level=1)
    spread = table.xs("min", axis=1, level=1).astype(float).round(3).astype(str) + "-" + \
        table.xs("max", axis=1, level=1).astype(float).round(3).astype(str)
    print(means.round(3).to_string())
    print("\nrange over seeds:\n" + spread.to_string())
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6
    print(f"\nwall time {time.perf_counter() - start:.0f} s, peak memory {peak_mb:.0f} MB")


if __name__ == "__main__":
    main()
