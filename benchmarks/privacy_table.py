"""The series' privacy-utility-cost table at full size: Part 5's table with more seeds and shadow models.

Run from the repository root (about 15 minutes on a 2-core CPU with the defaults; needs kymatio):

    SECURE_AI_DATA=/path/to/data .venv/bin/python benchmarks/privacy_table.py [--seeds 3] [--shadows 16]

For each seed: gradient inversion (the attack of Part 5, section 2) on batch-1 updates of the original
series' MLP, alone, under DP noise (sigma 1, clip 0.1: epsilon 4.4 for that one step), and averaged over 3
owners (what secure aggregation and CKKS reveal), on --digits digits each; membership inference (loss
threshold and LiRA with --shadows shadow models for every target, DP or not) against three targets trained on
500 digits: an overfit MLP (no protection), a linear model on ScatterNet features trained with DP-SGD at
epsilon 3 (full-batch steps, Tramer & Boneh's features: it learns as much as the overfit MLP), and the same
linear model trained without DP and stopped at the DP model's test accuracy (utility-matched, so that the
membership columns compare privacy, not how much the model learned); and each protection's time and bytes per
owner and round. The updates are computed in-process: Part 5 shows the same attack through syft. Prints the
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

from secure_ai import attacks as at  # noqa: E402
from secure_ai import costs as cost_model  # noqa: E402
from secure_ai import dp_sgd, membership, runtime  # noqa: E402
from secure_ai import features as ft  # noqa: E402
from secure_ai import privacy as dp  # noqa: E402
from secure_ai import training as tr  # noqa: E402
from secure_ai.data import mnist_tensors  # noqa: E402

HIDDEN, EPOCHS, DP_BATCH = 128, 30, 100
DP_EPSILON, DP_STEPS, DP_LR, DP_CLIP = 3.0, 30, 0.1, 1.0   # DP-SGD on ScatterNet features, full-batch steps
SIGMA, CLIP, OWNERS = 1.0, 0.1, 3
# (row of the table, technique of cost_model.round_costs): the DP row is named for what it is (DP review 5.7)
ROWS = [("plain FedAvg (overfit MLP)", "plain FedAvg"),
        ("DP-SGD (central, 500 digits; update: one DP step)", "FedAvg + DP"),
        ("secure aggregation (masks)", "secure aggregation (masks)"), ("CKKS", "CKKS"),
        ("DP + secure aggregation", "DP + secure aggregation"),
        ("no DP, utility-matched (ScatterNet + linear, stopped early)", None)]
SCATTER = None  # one ScatterNet for every model: each digit's features are computed once


def scatter() -> ft.ScatterNet:
    global SCATTER
    if SCATTER is None:
        SCATTER = ft.ScatterNet(compact=True, memo=True)
    return SCATTER


def train_plain(images, labels, seed):
    tr.set_seed(seed)
    net = tr.MLP(hidden=HIDDEN)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    for epoch in range(EPOCHS):
        tr.train_epoch(net, images, labels, optimizer, batch_size=32, seed=seed * 100 + epoch, progress=False)
    return net


def dp_trainer(epsilon):
    """DP-SGD on ScatterNet features; the target picks the noise for ``epsilon``, its shadows reuse it."""
    state = {}

    def train(images, labels, seed):
        tr.set_seed(seed)
        head = ft.linear_head()
        optimizer = torch.optim.SGD(head.parameters(), lr=DP_LR, momentum=0.9)
        budget = ({"noise_multiplier": state["sigma"]} if state else {"target_epsilon": epsilon,
                                                                      "epochs": DP_STEPS})
        # a seeded generator: a reproducible benchmark on public data (owners' code leaves it to the OS)
        run = dp_sgd.make_private(head, optimizer, scatter()(images), labels.long(), batch_size=len(labels),
                                  max_grad_norm=DP_CLIP, generator=torch.Generator().manual_seed(seed),
                                  **budget)
        for _ in range(DP_STEPS):  # q = 1: one step per epoch
            run.train_epoch(progress=False)
        state.setdefault("sigma", run.noise_multiplier)
        state.setdefault("epsilon", run.epsilon())
        return torch.nn.Sequential(scatter(), head)

    return train, state


def matched_trainer(accuracy, test, max_steps=500):
    """The DP model's architecture trained without DP (full-batch SGD, small steps), stopped at the first step
    whose test accuracy reaches ``accuracy``: the DP target's utility, without privacy."""
    test_features, test_labels = scatter()(test[0]), test[1].long()  # the same test set as the target's

    def train(images, labels, seed):
        tr.set_seed(seed)
        head = ft.linear_head()
        optimizer = torch.optim.SGD(head.parameters(), lr=DP_LR / 10, momentum=0.9)  # fine-grained stopping
        features, labels = scatter()(images), labels.long()
        for _ in range(max_steps):
            if ft.accuracy(head, test_features, test_labels) >= accuracy:
                break
            head.train()
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(head(features), labels).backward()
            optimizer.step()
        return torch.nn.Sequential(scatter(), head)

    return train


def dp_gradient(model, image, label, generator):
    """One DP-SGD step's gradient on one digit: clipped to CLIP, plus N(0, (SIGMA * CLIP)^2) noise."""
    gradient = at.gradient_of(model, image, label)
    norm = torch.sqrt(sum((g * g).sum() for g in gradient))
    scale = min(1.0, CLIP / (norm.item() + 1e-12))
    return [g * scale + torch.randn(g.shape, generator=generator) * SIGMA * CLIP for g in gradient]


def best_inversion(model, gradient, images, labels, reference, steps):
    guess = at.infer_labels(gradient, model, batch_size=len(labels), reference=reference)
    rebuilt = at.invert_gradient(model, gradient, guess, steps=steps, progress=False)
    return at.match_reconstructions(rebuilt, images)[1].max().item()


def inversion_row(seed, x, y, reference, digits, steps):
    """Best SSIM over ``digits`` attacked digits, for each technique's view of the update."""
    tr.set_seed(seed)
    model = tr.MLP()
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    best = {"alone": 0.0, "dp": 0.0, "sum": 0.0, "dp sum": 0.0}
    for _ in range(digits):
        idx = torch.from_numpy(rng.choice(len(y), OWNERS, replace=False))
        one = idx[:1]
        best["alone"] = max(best["alone"], best_inversion(
            model, at.gradient_of(model, x[one], y[one]), x[one], y[one], reference, steps))
        best["dp"] = max(best["dp"], best_inversion(
            model, dp_gradient(model, x[one], y[one], generator), x[one], y[one], reference, steps))
        owners = [at.gradient_of(model, x[i:i + 1], y[i:i + 1]) for i in idx]
        mean = [torch.stack(p).mean(0) for p in zip(*owners)]
        best["sum"] = max(best["sum"], best_inversion(model, mean, x[idx], y[idx], reference, steps))
        noisy = [dp_gradient(model, x[i:i + 1], y[i:i + 1], generator) for i in idx]
        mean = [torch.stack(p).mean(0) for p in zip(*noisy)]
        best["dp sum"] = max(best["dp sum"], best_inversion(model, mean, x[idx], y[idx], reference, steps))
    return {"plain FedAvg": best["alone"], "FedAvg + DP": best["dp"],
            "secure aggregation (masks)": best["sum"], "CKKS": best["sum"],
            "DP + secure aggregation": best["dp sum"]}


def local_update(private_update, seed, images, labels, sigma):
    """One owner's local epoch on ``images`` (plain SGD, or DP-SGD with noise ``sigma``): the flat weights."""
    tr.set_seed(seed)
    net = tr.MLP(hidden=HIDDEN)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05)
    if private_update:
        dp_sgd.make_private(net, optimizer, images, labels, batch_size=DP_BATCH, max_grad_norm=1.0,
                        noise_multiplier=sigma).train_epoch(progress=False)
    else:
        tr.train_epoch(net, images, labels, optimizer, batch_size=32, seed=seed, progress=False)
    return tr.model_to_vector(net)


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
    inversion_epsilon = dp.epsilon_spent([(SIGMA, 1.0, 1)])  # one Gaussian step on one digit
    rows = []
    for seed in range(args.seeds):
        tic = time.perf_counter()
        order = torch.from_numpy(np.random.default_rng(seed).permutation(len(y)))
        pool_x, pool_y = x[order[:1000]], y[order[:1000]]
        attack = functools.partial(membership.attack_membership, images=pool_x, labels=pool_y, test=test,
                                   n_shadows=args.shadows, seed=seed, progress=False)
        plain = attack(train_plain)
        train_dp, state = dp_trainer(DP_EPSILON)
        private = attack(train_dp)
        matched = attack(matched_trainer(private.accuracy, test))
        inversion = inversion_row(seed, x[order[1000:]], y[order[1000:]], test[0][:1000], args.digits,
                                  args.steps)
        update = functools.partial(local_update, seed=seed, images=pool_x[:250], labels=pool_y[:250],
                                   sigma=2.0)
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
                         "best inversion SSIM": inversion[technique] if technique else np.nan,
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
          f"digits (plain: overfit MLP; DP: ScatterNet + linear, DP-SGD, {DP_STEPS} full-batch steps, clip "
          f"{DP_CLIP}); inverted update: one step at sigma {SIGMA}, clip {CLIP}; mean [min, max] over "
          "seeds\n")
    means = table.xs("mean", axis=1, level=1)
    spread = table.xs("min", axis=1, level=1).astype(float).round(3).astype(str) + "-" + \
        table.xs("max", axis=1, level=1).astype(float).round(3).astype(str)
    print(means.round(3).to_string())
    print("\nrange over seeds:\n" + spread.to_string())
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6
    print(f"\nwall time {time.perf_counter() - start:.0f} s, peak memory {peak_mb:.0f} MB")


if __name__ == "__main__":
    main()
