"""What one update of the series' MLP gives away in closed form, to an honest or a malicious data scientist.

The MLP is 784 -> ``hidden`` -> ReLU -> 10 (:class:`secure_ai.training.MLP`). For its first layer,
``W1[i] x + b1[i]``, one digit's gradient is ``g_i * x`` for the weights and ``g_i`` for the bias, where
``g_i`` is the error signal reaching unit ``i`` (zero when the unit is off). So:

* **the analytic attack** (Phong et al. 2018; Geiping et al. 2020, Prop. D.1): in a batch-1 update,
  ``dL/dW1[i] / dL/db1[i]`` *is* the digit, for any active unit. In a sum of several owners' batch-1 updates,
  units active for one digit only give that digit, and the same vector comes out of many units: the
  attacker groups the repeated candidates (:func:`analytic_digits`);
* **imprint (trap) weights** (Fowl et al., "Robbing the Fed", ICLR 2022; Boenisch et al., EuroS&P 2023): the
  data scientist *chooses* the weights. Every unit measures the digit's brightness and switches on above its
  own threshold, the thresholds at quantiles of public digits (:func:`imprint_model`), and every unit feeds
  the logits the same way, so a digit's error signal is the same in every unit it reaches. Unit ``i`` then
  adds up the digits brighter than ``t_i``; the difference of two adjacent units is the digits between their
  thresholds, and a bin that holds one digit gives it back exactly (:func:`imprint_bins`), from a batch of any
  size, a local epoch, or a secure sum;
* **different models to different owners** (Pasquini et al., CCS 2022): the aggregator sends the real model to
  one owner and a model whose update it knows to the others, then reads that owner's exact count and update
  off the secure sum (:func:`inconsistent_models`, :func:`recover_target`).

Owner side, for measuring: Part 2's approved functions with its bounds as they hold (a full batch of
``batch_size`` digits from a seeded permutation, no wrap-around, only full batches in an epoch: the index
helpers of :mod:`secure_ai.training`; :func:`one_batch`, :func:`local_epoch`), the same step with DP-SGD
(:func:`dp_one_batch`), and what the aggregator receives from a round of Part 4's double masking or Part 5's
CKKS is simulated in :mod:`secure_ai.aggregator` (``masked_average``, ``ckks_average``). Grading
(:func:`grade`) compares reconstructions with the owners' digits.
"""
from __future__ import annotations

import numpy as np
import torch

from .attacks import identify
from .data import MNIST_STD, normalize
from .training import MLP, batch_indices, model_to_vector, train_epoch, vector_to_model

PIXELS, HIDDEN, CLASSES = 28 * 28, 500, 10
PIXEL_EXACT = 1e-3  # max error on [0, 1] pixels: a quarter of a grey level, so 8-bit rounding gives the digit
SENTINEL = -1.0  # the bias of the dead unit that counts the target's digits (inconsistent models)


def mlp_size(hidden: int = HIDDEN) -> int:
    """Number of weights of the MLP (397,510 for 500 hidden units)."""
    return PIXELS * hidden + hidden + hidden * CLASSES + CLASSES


def _layers(vector: np.ndarray, hidden: int):
    """``(W1, b1, W2, b2)`` as views of a flat MLP vector (writing to them writes to the vector)."""
    if vector.shape != (mlp_size(hidden),):
        raise ValueError(f"an MLP with {hidden} hidden units has {mlp_size(hidden)} weights, got shape "
                         f"{vector.shape}")
    w1, b1, w2 = np.split(vector, np.cumsum([PIXELS * hidden, hidden, CLASSES * hidden]))[:3]
    return w1.reshape(hidden, PIXELS), b1, w2.reshape(CLASSES, hidden), vector[-CLASSES:]


def _float64(vector) -> np.ndarray:
    return np.asarray(vector.detach().cpu() if hasattr(vector, "detach") else vector, dtype=np.float64)


def _split(vector, hidden: int):
    return _layers(_float64(vector), hidden)


def update_gradient(before, after, lr: float) -> np.ndarray:
    """``(before - after) / lr`` in float64: the gradient behind one plain SGD step (the sum of the
    gradients of an epoch's steps), from the weights sent and the weights that came back."""
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr!r}")
    return (_float64(before) - _float64(after)) / lr


# --- the analytic attack on an honest model ----------------------------------------------------------------
def analytic_candidates(gradient, hidden: int = HIDDEN) -> tuple[np.ndarray, np.ndarray]:
    """``(dL/dW1[i] / dL/db1[i], dL/db1[i])`` for every unit ``i`` whose bias gradient is not zero."""
    w1, b1, _, _ = _split(gradient, hidden)
    rows = np.flatnonzero(b1)
    return w1[rows] / b1[rows, None], b1[rows]


def analytic_digit(gradient, hidden: int = HIDDEN) -> np.ndarray:
    """The digit (normalized, 784 pixels) of a batch-1 update: the ratio of the unit with the largest
    bias gradient."""
    candidates, bias = analytic_candidates(gradient, hidden)
    if len(bias) == 0:
        raise ValueError("no unit of the first layer moved: the update carries no digit")
    return candidates[np.argmax(np.abs(bias))]


def analytic_digits(gradient, n_digits: int, hidden: int = HIDDEN, tol: float = 1e-3) -> np.ndarray:
    """Up to ``n_digits`` digits from a sum (or mean) of single-digit updates, without knowing any digit.

    A unit active for one digit only gives that digit exactly; a unit active for several gives a mixture
    whose weights differ from unit to unit. So the candidates that several units agree on (to ``tol`` on
    every normalized pixel) are digits: the largest such groups come back, largest first.
    """
    candidates, bias = analytic_candidates(gradient, hidden)
    free = np.ones(len(bias), dtype=bool)
    groups = []
    for row in np.argsort(-np.abs(bias)):
        if not free[row]:
            continue
        same = free & (np.abs(candidates - candidates[row]).max(axis=1) <= tol)
        free &= ~same
        if same.sum() >= 2:
            groups.append((same.sum(), candidates[same].mean(axis=0)))
    groups.sort(key=lambda group: -group[0])
    return np.array([digit for _, digit in groups[:n_digits]]).reshape(-1, PIXELS)


# --- imprint (trap) weights ---------------------------------------------------------------------------------
def brightness(images) -> np.ndarray:
    """Each digit's mean normalized pixel: what every unit of the imprint model measures."""
    images = normalize(images) if np.asarray(images).dtype == np.uint8 else torch.as_tensor(images)
    return images.reshape(len(images), -1).double().mean(1).numpy()


def imprint_model(public_images, hidden: int = HIDDEN, scale: float = 1e-4, gain: float = 1e-2) -> np.ndarray:
    """A float32 MLP vector whose first layer sorts digits into ``hidden`` bins of brightness.

    ``public_images`` (raw uint8 digits, e.g. MNIST's test set) give the thresholds: unit 0 is on for every
    digit, unit ``i`` for digits brighter than the ``i / hidden`` quantile, so each bin holds about as many
    digits. ``scale`` multiplies the first layer (its largest weight), ``gain`` the second, whose columns are
    all ``gain * (+1, -1, +1, ...)``: every digit's error signal is ``-+gain`` in every unit it reaches.
    Keep ``scale * gain`` small (the logits stay near 0, so the signal never vanishes).
    """
    if not (scale > 0 and gain > 0 and scale * gain * hidden <= 1e-2):
        raise ValueError(f"scale and gain must be positive with scale * gain * hidden <= 1e-2 (logits near "
                         f"0), got {scale}, {gain}")
    quantiles = np.quantile(brightness(public_images), np.arange(1, hidden) / hidden)
    thresholds = np.concatenate([[-1.0], quantiles])  # -1 is below every digit's brightness (>= -0.43)
    w1 = np.full((hidden, PIXELS), scale / PIXELS)
    w2 = np.repeat(gain * (-1.0) ** np.arange(CLASSES)[:, None], hidden, axis=1)
    return np.concatenate([w1.ravel(), -scale * thresholds, w2.ravel(), np.zeros(CLASSES)]).astype(np.float32)


def imprint_bins(gradient, hidden: int = HIDDEN) -> tuple[np.ndarray, np.ndarray]:
    """``(candidate digit, bias difference)`` of every bin: unit ``i`` minus unit ``i + 1`` (the last alone).

    A bin that holds one digit gives ``(g x) / g = x`` exactly; its bias difference is that digit's signal
    (``-+gain`` over the batch size, for a plain step), so the attacker can tell how full a bin is.
    """
    w1, b1, _, _ = _split(gradient, hidden)
    weights = w1 - np.concatenate([w1[1:], np.zeros((1, PIXELS))])
    bias = b1 - np.concatenate([b1[1:], [0.0]])
    with np.errstate(divide="ignore", invalid="ignore"):
        return weights / bias[:, None], bias


def imprint_digits(gradient, one_digit: float, hidden: int = HIDDEN, tol: float = 0.05) -> np.ndarray:
    """The attacker's reconstructions: the bins whose bias difference is one digit's, ``|one_digit|``.

    ``one_digit`` is ``gain`` times the weight of one digit in the gradient: ``1 / batch_size`` for
    :func:`one_batch` and :func:`local_epoch`, ``1 / (total count)`` for a FedAvg average of
    :func:`one_batch` updates.
    """
    candidates, bias = imprint_bins(gradient, hidden)
    return candidates[np.abs(np.abs(bias) / abs(one_digit) - 1) <= tol]


# --- grading (owner side) -----------------------------------------------------------------------------------
def _flat(images) -> np.ndarray:
    images = normalize(images) if np.asarray(images).dtype == np.uint8 else images
    images = images.detach().cpu().numpy() if hasattr(images, "detach") else np.asarray(images)
    return images.reshape(len(images), -1).astype(np.float64)


def grade(reconstructed, digits, labels, pool, pool_labels) -> dict:
    """How many of ``digits`` the reconstructions give back, pairing each digit with at most one of them.

    Pairs minimise the total L2 distance (Hungarian matching). A digit is **exact** when its reconstruction
    is within :data:`PIXEL_EXACT` of it on every pixel of [0, 1], and **identified** when the
    reconstruction is closer to it than to any digit of the same class in ``pool`` (public digits, e.g. the
    MNIST test set; :func:`secure_ai.attacks.identify`). Images are raw uint8 or normalized. ``errors``
    holds each digit's max pixel error (``inf`` for a digit left without a reconstruction).
    """
    from scipy.optimize import linear_sum_assignment

    x, labels = _flat(digits), np.asarray(labels)
    errors = np.full(len(x), np.inf)  # each digit's max pixel error (on [0, 1]) to its reconstruction
    identified = 0
    if len(reconstructed):
        found = np.nan_to_num(_flat(reconstructed), nan=1e6, posinf=1e6, neginf=-1e6)
        squared = (x**2).sum(1)[:, None] + (found**2).sum(1)[None] - 2 * x @ found.T
        rows, cols = linear_sum_assignment(np.sqrt(np.maximum(squared, 0)))
        errors[rows] = np.abs(found[cols] - x[rows]).max(1) * MNIST_STD
        identified = identify(found[cols], x[rows], labels[rows], pool, pool_labels)[0].sum()
    return {"digits": len(x), "exact": int((errors < PIXEL_EXACT).sum()), "identified": int(identified),
            "median error": float(np.median(errors)), "errors": errors}


# --- owner side: Part 2's approved steps, with its bounds as meant ------------------------------------------
def _model(vector, hidden: int) -> MLP:
    return vector_to_model(torch.as_tensor(np.asarray(vector, dtype=np.float32)), MLP(hidden=hidden))


def _raw(images, idx=None) -> torch.Tensor:
    images = np.asarray(images)
    return torch.from_numpy(np.array(images if idx is None else images[idx]))  # a copy, writable


def one_batch(vector, images, labels, *, lr: float, batch_size: int, batch: int = 0, seed: int = 0,
              hidden: int = HIDDEN) -> np.ndarray:
    """Part 2's ``one_batch``: one plain SGD step on the full batch :func:`secure_ai.training.batch_indices`
    gives (a tail or a wrap-around is refused); returns the new float32 vector."""
    idx = batch_indices(len(labels), batch_size, batch, seed)
    model = _model(vector, hidden)
    train_epoch(model, _raw(images, idx), torch.as_tensor(np.asarray(labels)[idx]),
                torch.optim.SGD(model.parameters(), lr=lr), batch_size=batch_size, seed=0, progress=False)
    return model_to_vector(model).numpy()


def local_epoch(vector, images, labels, *, lr: float, batch_size: int, seed: int = 0, momentum: float = 0.0,
                hidden: int = HIDDEN) -> np.ndarray:
    """Part 2's ``train_on_mnist``: one local epoch of full batches only (the digits
    :func:`secure_ai.training.epoch_indices` lists); returns the new float32 vector."""
    model = _model(vector, hidden)
    train_epoch(model, _raw(images), torch.as_tensor(np.asarray(labels)),
                torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum), batch_size=batch_size,
                seed=seed, progress=False, drop_last=True)
    return model_to_vector(model).numpy()


def dp_one_batch(vector, images, labels, *, lr: float, batch_size: int, noise_multiplier: float,
                 max_grad_norm: float, batch: int = 0, seed: int = 0, hidden: int = HIDDEN) -> np.ndarray:
    """``one_batch`` with DP-SGD (Opacus, as Part 6's ``dp_step``): each digit's gradient clipped to
    ``max_grad_norm``, Gaussian noise of std ``noise_multiplier * max_grad_norm`` on their sum, divided by
    ``batch_size``. The noise comes from :func:`secure_ai.dp_sgd.make_private`'s generator, seeded by the
    operating system, never from the caller."""
    from .dp_sgd import make_private

    idx = batch_indices(len(labels), batch_size, batch, seed)
    model = _model(vector, hidden)
    private = make_private(model, torch.optim.SGD(model.parameters(), lr=lr), _raw(images, idx),
                           torch.as_tensor(np.asarray(labels)[idx]), batch_size=batch_size,
                           max_grad_norm=max_grad_norm, noise_multiplier=noise_multiplier)
    private.train_epoch(progress=False)  # sample rate 1: the whole batch, one noisy step
    return model_to_vector(model).numpy()


# --- different models to different owners -------------------------------------------------------------------
def inconsistent_models(real_vector, n_owners: int, target: int = 0,
                        hidden: int = HIDDEN) -> list[np.ndarray]:
    """What a cheating aggregator sends each owner in one round: ``target`` gets the real model with its last
    hidden unit dead (bias :data:`SENTINEL`, weights 0: it never moves, and counts the target's digits in
    the sum), every other owner the all-zero model, whose units are all dead: only its 10 output biases
    move."""
    if not 0 <= target < n_owners or n_owners < 2:
        raise ValueError(f"need a target among at least 2 owners, got target {target} of {n_owners}")
    real = np.array(real_vector, dtype=np.float32)
    w1, b1, w2, _ = _layers(real, hidden)
    w1[-1], b1[-1], w2[:, -1] = 0.0, SENTINEL, 0.0
    return [real if i == target else np.zeros_like(real) for i in range(n_owners)]


def recover_target(average, n_total: int, hidden: int = HIDDEN) -> tuple[int, np.ndarray]:
    """``(the target's count, its weights)`` from a round of :func:`inconsistent_models`.

    The sum is ``n_target * w_target`` on every weight but the output biases (the zero models add nothing
    there), and ``n_target * SENTINEL`` on the dead unit's bias. The output biases (last 10 entries) mix
    every owner's and come back as NaN.
    """
    total = _float64(average) * n_total
    count = int(round(_split(total, hidden)[1][-1] / SENTINEL))
    if not 1 <= count <= n_total:
        raise ValueError(f"the dead unit counts {count} digits of {n_total}: not a round of inconsistent "
                         "models")
    weights = total / count
    weights[-CLASSES:] = np.nan
    return count, weights
