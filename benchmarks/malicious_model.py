"""What a malicious (or merely curious) data scientist gets from one update of the series' MLP, within the
owners' bounds: every number Part 6's "malicious model" section and the README quote.

Run from the repository root (about 2 minutes on a 2-core CPU):

    SECURE_AI_DATA=/path/to/data .venv/bin/python benchmarks/malicious_model.py

The owners' side is Part 2's approved code with its bounds as they are meant to hold (batch_size >= 32, lr in
(0, 0.1], momentum <= 0.99, a finite float32 vector; a full batch from a seeded permutation, no wrap-around,
full batches only in an epoch), run in-process (Part 6 shows the same calls through syft). Three owners, joe,
jane and jill, hold 300 training digits each; the data scientist's public data is MNIST's test set.
Secure aggregation is one real round of Part 4's double masking; CKKS is Part 5's key holder, with its
flooding noise (a key holder sized for one round of these vectors: sigma 2.1 in the sum's units for 397,510
weights, 0.97 for 79,510). Part 4's owners now refuse section G's round (they confirm the model they trained):
those in-process rounds hand each owner an update already made, and show what the binding prevents.

A digit is **exact** when a reconstruction is within 1e-3 of it on every pixel of [0, 1] (a quarter of a grey
level: rounding to 8 bits gives the digit back), and **identified** when the reconstruction is closer to it
than to any of the ~1,000 test digits of its class. "flagged" counts only the bins the attacker itself
reads as holding one digit; "any bin" grades every bin. Published anchors: Fowl et al. (ICLR 2022) recover
most of a batch with 500+ bins; the analytic batch-1 attack is exact (Phong et al. 2018).
"""
from __future__ import annotations

import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tutorials"))

from secure_ai import aggregator, runtime  # noqa: E402
from secure_ai import imprint as im  # noqa: E402
from secure_ai import training as tr  # noqa: E402
from secure_ai.data import mnist_raw  # noqa: E402

OWNERS, DIGITS, LR, SEED = ("joe", "jane", "jill"), 300, 0.1, 0
SIGMA, CLIP = 1.0, 0.1  # Part 6's DP recipe (Part 3's federated one): noise multiplier, clipping norm
SCALE, GAIN = 1e-4, 1e-2  # the imprint model for single steps: every weight within 0.01


def line(title: str, result: dict, seconds: float | None = None, extra: str = "") -> None:
    took = f", {seconds:.1f} s" if seconds is not None else ""
    print(f"  {title}: exact {result['exact']}/{result['digits']}, identified {result['identified']}/"
          f"{result['digits']}, median max-pixel error {result['median error']:.1e}{took}{extra}", flush=True)


def add(total: dict | None, result: dict) -> dict:
    if total is None:
        return dict(result, medians=[result["median error"]])
    merged = {key: total[key] + result[key] for key in ("digits", "exact", "identified")}
    return merged | {"medians": total["medians"] + [result["median error"]],
                     "median error": float(np.median(total["medians"] + [result["median error"]]))}


def main() -> None:
    runtime.configure()
    start, load = time.perf_counter(), os.getloadavg()[0]
    images, labels = mnist_raw(train=True)
    public, public_labels = mnist_raw(train=False)
    order = np.random.default_rng(SEED).permutation(len(labels))
    shards = {name: order[i * DIGITS:(i + 1) * DIGITS] for i, name in enumerate(OWNERS)}
    data = {name: (images[idx], labels[idx]) for name, idx in shards.items()}
    grade = lambda found, digits, true: im.grade(found, digits, true, public, public_labels)
    tr.set_seed(SEED)
    honest = tr.model_to_vector(tr.MLP()).numpy()
    print(f"{os.cpu_count()} CPUs, load average {load:.2f}; 3 owners x {DIGITS} digits; lr {LR}")

    print("\nA. The analytic attack on the honest MLP (Part 6's batch-1 sgd_step; Part 2 refuses batch 1)")
    tic, found = time.perf_counter(), []
    for k in range(20):
        after = im.one_batch(honest, *data["joe"], lr=LR, batch_size=1, batch=k, seed=SEED)
        found.append(im.analytic_digit(im.update_gradient(honest, after, LR)))
    joe_digits = [tr.batch_indices(DIGITS, 1, k, SEED)[0] for k in range(20)]
    line("20 batch-1 updates", grade(np.array(found), data["joe"][0][joe_digits], data["joe"][1][joe_digits]),
         time.perf_counter() - tic)
    tic, total, groups = time.perf_counter(), None, 0
    for r in range(20):
        afters = [im.one_batch(honest, *data[n], lr=LR, batch_size=1, batch=20 + r, seed=SEED)
                  for n in OWNERS]
        average, _ = aggregator.masked_average(afters, [1, 1, 1])
        digits = im.analytic_digits(im.update_gradient(honest, average, LR), n_digits=3)
        groups += len(digits)
        idx = tr.batch_indices(DIGITS, 1, 20 + r, SEED)
        total = add(total, grade(digits, np.concatenate([data[n][0][idx] for n in OWNERS]),
                                 np.concatenate([data[n][1][idx] for n in OWNERS])))
    line("20 masked sums of 3 owners' batch-1 updates (attacker groups repeated rows)", total,
         time.perf_counter() - tic, f"; {groups} digits returned")

    print(f"\nB. Imprint model (scale {SCALE}, gain {GAIN}), one_batch at lr {LR}, one batch of each owner")
    model = im.imprint_model(public, scale=SCALE, gain=GAIN)
    print(f"  imprint model: max |w| {np.abs(model).max():.1e}, min nonzero |w| "
          f"{np.abs(model[model != 0]).min():.1e}, finite float32 of {model.size:,} weights")
    for batch_size in (32, 64, 128, 256):
        tic, flagged, any_bin = time.perf_counter(), None, None
        for name in OWNERS:
            idx = tr.batch_indices(DIGITS, batch_size, 0, SEED)
            after = im.one_batch(model, *data[name], lr=LR, batch_size=batch_size, seed=SEED)
            gradient = im.update_gradient(model, after, LR)
            digits, true = data[name][0][idx], data[name][1][idx]
            flagged = add(flagged, grade(im.imprint_digits(gradient, GAIN / batch_size), digits, true))
            any_bin = add(any_bin, grade(im.imprint_bins(gradient)[0], digits, true))
        line(f"batch {batch_size}, flagged", flagged, time.perf_counter() - tic)
        line(f"batch {batch_size}, any bin", any_bin)
    idx = tr.batch_indices(DIGITS, 32, 0, SEED)
    for bound in (1e-3, 1e-6, 1e-10):   # a magnitude bound: the attack is the same at any scale
        small = im.imprint_model(public, scale=bound / 100, gain=bound)
        after = im.one_batch(small, *data["joe"], lr=LR, batch_size=32, seed=SEED)
        gradient = im.update_gradient(small, after, LR)
        line(f"batch 32 with every weight within {np.abs(small).max():.0e} (joe)",
             grade(im.imprint_digits(gradient, bound / 32), data["joe"][0][idx], data["joe"][1][idx]))

    print("\nC. train_on_mnist: one local epoch of full batches (32: 288 of 300 digits), momentum 0")
    # The attacker tunes lr and rho = lr * gain / scale on public digits, then attacks each owner with them
    tic, trials = time.perf_counter(), {}
    tune = (public[:DIGITS], public_labels[:DIGITS])
    idx = tr.epoch_indices(DIGITS, 32, SEED)
    for lr in (1e-11, 1e-8, 1e-5, 1e-3, 1e-2, 1e-1):
        for rho in (3e-5, 1e-4, 3e-4):
            gain, scale = (1e-6 * rho / lr) ** 0.5, (1e-6 * lr / rho) ** 0.5   # scale * gain = 1e-6
            crafted = im.imprint_model(public, scale=scale, gain=gain)
            gradient = im.update_gradient(crafted, im.local_epoch(crafted, *tune, lr=lr, batch_size=32,
                                                                  seed=SEED), lr)
            trials[lr, rho] = grade(im.imprint_bins(gradient)[0], tune[0][idx], tune[1][idx]) | {
                "model": crafted, "gain": gain}
    for lr in sorted({lr for lr, _ in trials}):
        best = max((trials[lr, rho] for _, rho in [key for key in trials if key[0] == lr]),
                   key=lambda t: (t["exact"], t["identified"]))
        print(f"  public digits, lr {lr:.0e}: best exact {best['exact']}/288, identified "
              f"{best['identified']}/288 (max |w| {np.abs(best['model']).max():.1e})")
    (lr, rho), best = max(trials.items(), key=lambda item: (item[1]["exact"], item[1]["identified"]))
    crafted = best["model"]
    print(f"  tuning took {time.perf_counter() - tic:.0f} s; attacker's choice: lr {lr:.0e}, rho {rho:.0e}, "
          f"max |w| {np.abs(crafted).max():.1e}")
    tic, flagged, any_bin = time.perf_counter(), None, None
    for name in OWNERS:
        gradient = im.update_gradient(crafted, im.local_epoch(crafted, *data[name], lr=lr, batch_size=32,
                                                              seed=SEED), lr)
        digits, true = data[name][0][idx], data[name][1][idx]
        flagged = add(flagged, grade(im.imprint_digits(gradient, best["gain"] / 32, tol=0.1), digits, true))
        any_bin = add(any_bin, grade(im.imprint_bins(gradient)[0], digits, true))
    line("3 owners' epochs, flagged", flagged, time.perf_counter() - tic)
    line("3 owners' epochs, any bin", any_bin)
    for lr_fixed in (1e-3, 1e-1):
        rho_best = max((trials[lr_fixed, r] for r in (3e-5, 1e-4, 3e-4)), key=lambda t: t["identified"])
        crafted = rho_best["model"]
        after = im.local_epoch(crafted, *data["joe"], lr=lr_fixed, batch_size=32, seed=SEED)
        gradient = im.update_gradient(crafted, after, lr_fixed)
        line(f"joe's epoch at lr {lr_fixed:.0e} (an lr floor), any bin",
             grade(im.imprint_bins(gradient)[0], data["joe"][0][idx], data["joe"][1][idx]))

    print("\nD. Through a 3-owner secure sum of batch-32 one_batch updates (Part 4's masks), 3 rounds")
    tic, flagged, any_bin = time.perf_counter(), None, None
    for r in range(3):
        idx = tr.batch_indices(DIGITS, 32, r, SEED)
        afters = [im.one_batch(model, *data[n], lr=LR, batch_size=32, batch=r, seed=SEED) for n in OWNERS]
        average, n_total = aggregator.masked_average(afters, [32] * 3)
        gradient = im.update_gradient(model, average, LR)
        digits = np.concatenate([data[n][0][idx] for n in OWNERS])
        true = np.concatenate([data[n][1][idx] for n in OWNERS])
        flagged = add(flagged, grade(im.imprint_digits(gradient, GAIN / n_total), digits, true))
        any_bin = add(any_bin, grade(im.imprint_bins(gradient)[0], digits, true))
    line("masked sums, flagged", flagged, time.perf_counter() - tic)
    line("masked sums, any bin", any_bin)

    print("\nE. Through CKKS (Part 5's key holder, sized for one round), round 0 of D, by gain (largest |w|)")
    afters_of = {}
    idx = tr.batch_indices(DIGITS, 32, 0, SEED)
    digits = np.concatenate([data[n][0][idx] for n in OWNERS])
    true = np.concatenate([data[n][1][idx] for n in OWNERS])
    for gain in (1.0, 1e2, 1e3):
        tic = time.perf_counter()
        crafted = im.imprint_model(public, scale=1e-6 / gain, gain=gain)
        afters_of[gain] = [im.one_batch(crafted, *data[n], lr=LR, batch_size=32, seed=SEED) for n in OWNERS]
        average, n_total = aggregator.ckks_average(afters_of[gain], [32] * 3)
        gradient = im.update_gradient(crafted, average, LR)
        flagged = grade(im.imprint_digits(gradient, gain / n_total, tol=0.2), digits, true)
        line(f"gain {gain:.0e} (max |w| {np.abs(crafted).max():.0e}), flagged", flagged,
             time.perf_counter() - tic)
        line(f"gain {gain:.0e}, any bin", grade(im.imprint_bins(gradient)[0], digits, true))

    print(f"\nF. Owner-side DP-SGD (sigma {SIGMA}, clip {CLIP}), one batch of 32 at lr {LR}")
    models = {"imprint": model, "imprint, gain 1e3": im.imprint_model(public, scale=1e-9, gain=1e3),
              "honest": honest, "all-zero": np.zeros_like(honest)}
    idx = tr.batch_indices(DIGITS, 32, 0, SEED)
    for name, crafted in models.items():
        tic = time.perf_counter()
        after = im.dp_one_batch(crafted, *data["joe"], lr=LR, batch_size=32, noise_multiplier=SIGMA,
                                max_grad_norm=CLIP, seed=SEED)
        gradient = im.update_gradient(crafted, after, LR)
        ratio = gradient.std() * 32 / (SIGMA * CLIP)
        result = grade(im.imprint_bins(gradient)[0], data["joe"][0][idx], data["joe"][1][idx])
        line(f"{name}: noise std {ratio:.4f} x nominal; any bin", result, time.perf_counter() - tic)
    afters = [im.dp_one_batch(model, *data[n], lr=LR, batch_size=32, noise_multiplier=SIGMA,
                              max_grad_norm=CLIP, seed=SEED) for n in OWNERS]
    average, n_total = aggregator.masked_average(afters, [32] * 3)
    gradient = im.update_gradient(model, average, LR)
    line("DP + masked sum of 3 owners, any bin", grade(im.imprint_bins(gradient)[0], digits, true))

    print("\nG. Different models to different owners, one round (joe: the real model; jane, jill: all-zero), "
          "without the model binding that Part 4's owners now check")
    sent = im.inconsistent_models(honest, 3, target=0)
    afters = [im.local_epoch(v, *data[n], lr=LR, batch_size=32, seed=SEED) for v, n in zip(sent, OWNERS)]
    for view in (aggregator.masked_average, aggregator.ckks_average):
        tic = time.perf_counter()
        count, weights = im.recover_target(*view(afters, [DIGITS] * 3))
        error = np.nanmax(np.abs(weights - afters[0]))
        print(f"  {view.__name__}: joe's count {count} (true {DIGITS}); his {np.isfinite(weights).sum():,} "
              f"of {weights.size:,} weights, max error {error:.1e}, {time.perf_counter() - tic:.1f} s")

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3
    print(f"\n{time.perf_counter() - start:.0f} s, peak memory {peak:.0f} MB; load average {load:.2f} -> "
          f"{os.getloadavg()[0]:.2f} (shared machine: timings are noisy)")


if __name__ == "__main__":
    main()
