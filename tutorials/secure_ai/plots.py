"""Every figure of the series: what a reader would rather look at than read.

Digits, label histograms and learning curves (Parts 1-2, 7); noisy answers and privacy against utility
(Part 3); top bytes of shares and masked vectors, and the flooding noise (Parts 4-5); reconstructions and
membership ROC curves with the DP bound (Part 6); label shares per owner.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.ticker import MaxNLocator

from .data import MNIST_MEAN, MNIST_STD
from .privacy import dp_tpr_bound


def show_digits(images, labels=None, n: int = 32, cols: int = 8, title: str | None = None):
    """A grid of the first ``n`` digits (normalized or raw), each titled with its label."""
    images = torch.as_tensor(np.array(images) if isinstance(images, np.ndarray) else images)  # read-only ok
    if images.ndim == 4:
        images = images[:, 0]
    if images.ndim != 3:
        raise ValueError(f"images must have shape (N, 28, 28) or (N, 1, 28, 28), got {tuple(images.shape)}")
    n = min(n, len(images))
    if n == 0:
        raise ValueError("no images to show")
    if images.is_floating_point() and images.min() < 0:  # undo Normalize for display
        images = images * MNIST_STD + MNIST_MEAN
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.1, rows * 1.25), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            ax.imshow(images[i], cmap="gray_r")
            if labels is not None:
                ax.set_title(int(labels[i]), fontsize=9)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_label_histogram(labels_by_owner: Mapping[str, Sequence[int]], n_classes: int = 10, ax=None):
    """Side-by-side bars: how many samples of each digit every data owner holds."""
    if not labels_by_owner:
        raise ValueError("labels_by_owner is empty: pass {owner name: labels}")
    if ax is None:
        _, ax = plt.subplots(figsize=(8, 3.2))
    width = 0.8 / len(labels_by_owner)
    classes = np.arange(n_classes)
    for i, (owner, labels) in enumerate(labels_by_owner.items()):
        counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=n_classes)[:n_classes]
        ax.bar(classes + (i - (len(labels_by_owner) - 1) / 2) * width, counts, width, label=owner)
    ax.set(xticks=classes, xlabel="digit", ylabel="samples", title="Labels held by each data owner")
    ax.legend()
    ax.figure.tight_layout()
    return ax.figure


def plot_learning_curves(curves: Mapping[str, Sequence[float]], xlabel: str = "round",
                         ylabel: str = "test accuracy", ax=None):
    """One line per run (e.g. federated vs centralized), x = 1..len(curve)."""
    if not curves:
        raise ValueError("curves is empty: pass {run name: [value per round]}")
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3.5))
    for name, values in curves.items():
        values = list(values)
        ax.plot(range(1, len(values) + 1), values, marker="o", label=name)
    ax.set(xlabel=xlabel, ylabel=ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds and epochs are whole numbers
    ax.grid(alpha=0.3)
    ax.legend()
    ax.figure.tight_layout()
    return ax.figure


# --- Part 3: differential privacy ------------------------------------------------------------------------
def plot_noisy_answers(answers: Mapping[str, Sequence[float]], bins: int = 60, ax=None):
    """Overlaid histograms of a mechanism's answers, e.g. on two datasets that differ in one person."""
    if not answers:
        raise ValueError("answers is empty: pass {dataset name: noisy answers}")
    if ax is None:
        _, ax = plt.subplots(figsize=(6.5, 3.2))
    values = np.concatenate([np.asarray(a, dtype=float).ravel() for a in answers.values()])
    edges = np.linspace(values.min(), values.max(), bins + 1)
    for name, a in answers.items():
        ax.hist(np.asarray(a, dtype=float).ravel(), bins=edges, alpha=0.5, label=name)
    ax.set(xlabel="noisy answer", ylabel="how often")
    ax.legend()
    ax.figure.tight_layout()
    return ax.figure


_EPSILON_TICKS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 3, 5, 8, 10, 20, 50)


def plot_privacy_utility(curves: Mapping[str, Sequence[tuple[float, float]]],
                         baselines: Mapping[str, float] | None = None,
                         anchors: Mapping[str, tuple[float, float]] | None = None, log_epsilon: bool = True,
                         xlabel: str = "epsilon (delta = 1e-5)", ax=None):
    """Test accuracy against epsilon: one line of ``(epsilon, accuracy)`` points per run.

    ``baselines`` draws non-private models' accuracies ``{label: accuracy}`` as dashed horizontal lines, the
    i-th in the colour of the i-th curve (list them in the same order);
    ``anchors`` marks published results ``{label: (epsilon, accuracy)}``. Epsilon is on a log scale unless
    ``log_epsilon`` is false. Compare like with like: give every curve and anchor by the same accountant,
    named in ``xlabel``.
    """
    if not curves:
        raise ValueError("curves is empty: pass {run name: [(epsilon, accuracy), ...]}")
    if ax is None:
        _, ax = plt.subplots(figsize=(9, 4))
    epsilons = []
    for name, points in curves.items():
        points = np.asarray(points, dtype=float).reshape(-1, 2)
        ax.plot(points[:, 0], points[:, 1], marker="o", label=name)
        epsilons.extend(points[:, 0])
    for i, (label, accuracy) in enumerate((baselines or {}).items()):  # in the colour of the i-th curve
        ax.axhline(accuracy, color=f"C{i}", linestyle="--", label=f"{label} ({accuracy:.1%})")
    for label, (epsilon, accuracy) in (anchors or {}).items():
        ax.plot([epsilon], [accuracy], marker="*", markersize=12, linestyle="none", label=label)
        epsilons.append(epsilon)
    ax.set(xlabel=xlabel, ylabel="test accuracy")
    if log_epsilon:
        ax.set_xscale("log")
        low, high = min(epsilons), max(epsilons)
        ticks = [t for t in _EPSILON_TICKS if low / 1.5 <= t <= high * 1.5]
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.minorticks_off()
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.figure.tight_layout()
    return ax.figure


# --- Parts 4 and 5: secure aggregation and homomorphic encryption -----------------------------------------
def plot_top_bytes(columns: Mapping[str, np.ndarray]):
    """One histogram per entry of ring elements (uint64): how often each value of their top byte occurs.

    A secret's top bytes pile up (small positive numbers near 0, negative ones near 255); a share's or a
    masked vector's are flat.
    """
    if not columns:
        raise ValueError("columns is empty: pass {title: uint64 values}")
    fig, axes = plt.subplots(1, len(columns), figsize=(2.75 * len(columns), 2.4), sharey=True, squeeze=False)
    for ax, (title, values) in zip(axes[0], columns.items()):
        values = np.asarray(values)
        if values.dtype != np.uint64:
            raise ValueError(f"{title!r}: expected ring elements (uint64), got {values.dtype}")
        ax.hist((values.ravel() >> np.uint64(56)).astype(int), bins=64, range=(0, 256))
        ax.set(title=title, xlabel="top byte")
    axes[0, 0].set_ylabel("count")
    fig.tight_layout()
    return fig


def plot_noise(errors, sigma: float, xlabel: str, title: str | None = None, ax=None):
    """Histogram of ``errors`` with the Gaussian density of standard deviation ``sigma`` over it."""
    errors = np.asarray(errors, dtype=float).ravel()
    if errors.size == 0 or not sigma > 0:
        raise ValueError(f"need some errors and sigma > 0, got {errors.size} errors and sigma {sigma!r}")
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 2.8))
    ax.hist(errors, bins=80, density=True, alpha=0.7, label="measured")
    x = np.linspace(errors.min(), errors.max(), 200)
    density = np.exp(-0.5 * (x / sigma) ** 2) / (sigma * np.sqrt(2 * np.pi))
    ax.plot(x, density, label=f"Gaussian, σ = {sigma:.3g}")
    ax.set(xlabel=xlabel, ylabel="density", title=title)
    ax.legend(fontsize=8)
    ax.figure.tight_layout()
    return ax.figure


# --- Part 6: attacks --------------------------------------------------------------------------------------
def plot_reconstructions(rows: Mapping[str, tuple], n: int = 8):
    """Originals above reconstructions, one block per attack: ``{title: (originals, rebuilt, psnr,
    identified)}``.

    ``rebuilt[i]`` is the reconstruction paired with ``originals[i]``, ``psnr[i]`` its PSNR in dB (shown above
    it) and ``identified[i]`` whether it singles out that digit (:func:`secure_ai.attacks.identify`: then the
    PSNR is in bold, with a tick). Shows at most ``n`` digits per row.
    """
    if not rows:
        raise ValueError("rows is empty: pass {title: (originals, reconstructions, psnr, identified)}")
    cols = min(n, max(len(r[0]) for r in rows.values()))
    cell, gap, title_h, label_h = 0.85, 0.1, 0.3, 0.22  # inches
    block = title_h + 2 * cell + label_h + 0.15
    width, height = max(cols * (cell + gap) + gap, 5.0), len(rows) * block
    fig = plt.figure(figsize=(width, height))
    for k, (title, (originals, rebuilt, psnr, identified)) in enumerate(rows.items()):
        originals, rebuilt = torch.as_tensor(originals), torch.as_tensor(rebuilt)
        if not len(originals) == len(rebuilt) == len(psnr) == len(identified):
            raise ValueError(f"{title!r}: originals, reconstructions, psnr and identified must have the same "
                             "length")
        top = height - k * block
        fig.text(gap / width, (top - 0.22) / height, title, fontsize=9)
        for i in range(min(cols, len(originals))):
            left = (gap + i * (cell + gap)) / width
            for row, image in ((0, originals[i]), (1, rebuilt[i])):
                bottom = top - title_h - cell - row * (cell + label_h)
                ax = fig.add_axes((left, bottom / height, cell / width, cell / height))
                ax.imshow(image.reshape(28, 28) * MNIST_STD + MNIST_MEAN, cmap="gray_r", vmin=0, vmax=1)
                ax.axis("off")
            mark = bool(identified[i])
            ax.set_title(f"{float(psnr[i]):.0f} dB" + (" \u2713" if mark else ""), fontsize=8,
                         fontweight="bold" if mark else "normal")
    return fig


def plot_roc(curves: Mapping[str, tuple], bounds: Mapping[str, tuple[float, float]] | None = None, ax=None):
    """ROC curves of membership attacks on log-log axes, where the low false-positive rates are visible.

    ``curves`` maps a label to ``(fpr, tpr)``; ``bounds`` maps a label to ``(epsilon, delta)`` and draws the
    most any attack can reach against that DP training (dashed, in the colour of the curve in the same
    position). The diagonal is guessing.
    """
    if not curves:
        raise ValueError("curves is empty: pass {attack: (fpr, tpr)}")
    if ax is None:
        _, ax = plt.subplots(figsize=(5.5, 4.5))
    grid = np.logspace(-3, 0, 200)[:-1]
    ax.plot(grid, grid, color="gray", linestyle=":", label="guessing")
    for k, (label, (fpr, tpr)) in enumerate(curves.items()):
        ax.plot(np.maximum(fpr, 1e-3), tpr, color=f"C{k}", label=label)
    for k, (label, (epsilon, delta)) in enumerate((bounds or {}).items()):  # k-th bound: k-th curve's colour
        ax.plot(grid, dp_tpr_bound(grid, epsilon, delta), linestyle="--", color=f"C{k}", label=label)
    ax.set(xscale="log", yscale="log", xlim=(1e-3, 1), ylim=(1e-3, 1.05), xlabel="false-positive rate",
           ylabel="true-positive rate")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    ax.figure.tight_layout()
    return ax.figure


def plot_label_shares(splits: Mapping[str, Sequence[Sequence[int]]], n_classes: int = 10):
    """One panel per split: owners (rows) x digits (columns), shaded by each owner's share of that digit."""
    if not splits:
        raise ValueError("splits is empty: pass {split name: [labels of owner 0, labels of owner 1, ...]}")
    fig, axes = plt.subplots(1, len(splits), figsize=(3.2 * len(splits), 3.0), squeeze=False)
    for ax, (name, owners) in zip(axes[0], splits.items()):
        counts = np.array([np.bincount(np.asarray(o, dtype=np.int64), minlength=n_classes)[:n_classes]
                           for o in owners], dtype=float)
        ax.imshow(counts / counts.sum(0, keepdims=True).clip(min=1), cmap="Blues", vmin=0, aspect="auto")
        ax.set(title=name, xlabel="digit", xticks=range(n_classes), yticks=range(len(owners)))
        ax.set_ylabel("owner")
    fig.tight_layout()
    return fig
