"""Attacks on what federated learning sends and publishes: gradient inversion and membership inference.

* updates: :func:`gradient_from_update` turns a one-step SGD update into the gradient it was made of
* labels: :func:`infer_labels` reads the labels of a batch off the last layer's gradient (iDLG, Zhao et
  al. 2020; with counts for larger batches, as in Wainakh et al. 2022)
* images: :func:`invert_gradient` optimises dummy digits until their gradient matches (DLG, Zhu et al. 2019,
  with the cosine distance and total-variation prior of Geiping et al. 2020)
* quality: :func:`ssim` and :func:`psnr`, :func:`match_reconstructions` pairs each
  original digit with its best reconstruction
* membership: :func:`loss_scores` (Yeom et al. 2018), :func:`shadow_confidences` and :func:`lira_scores`
  (a small likelihood-ratio attack in the spirit of LiRA, Carlini et al. 2022)
* :func:`attack_membership` runs both on one target model (trained by a function you give)
* ROC: :func:`roc_curve`, :func:`roc_auc`, :func:`tpr_at_fpr`, and :func:`dp_tpr_bound`, the most any attack
  can achieve against an (epsilon, delta)-DP training
* the cost side of the privacy table: :func:`round_costs` (time and bytes per owner and round)

Everything is seeded: the same inputs give the same numbers.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .data import MNIST_MEAN, MNIST_STD

PIXEL_LOW, PIXEL_HIGH = (0.0 - MNIST_MEAN) / MNIST_STD, (1.0 - MNIST_MEAN) / MNIST_STD  # normalized range


# --- updates and gradients ---------------------------------------------------------------------------------
def _check_images(images: torch.Tensor, what: str = "images") -> None:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or tuple(images.shape[1:]) != (1, 28, 28):
        shape = tuple(images.shape) if hasattr(images, "shape") else type(images).__name__
        raise ValueError(f"{what} must be a float tensor of shape (N, 1, 28, 28), got {shape}")
    if len(images) == 0:
        raise ValueError(f"{what} is empty: an attack needs at least one image")


def _parameters(model: nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def split_vector(vector, model: nn.Module) -> list[torch.Tensor]:
    """A flat vector (as :func:`secure_ai.training.model_to_vector` makes) cut into ``model``'s shapes."""
    vector = torch.as_tensor(np.asarray(vector) if not isinstance(vector, torch.Tensor) else vector).float()
    params = _parameters(model)
    expected = sum(p.numel() for p in params)
    if vector.ndim != 1 or vector.numel() != expected:
        raise ValueError(
            f"{type(model).__name__} has {expected} parameters but the vector has shape {tuple(vector.shape)}"
        )
    return [t.view_as(p).clone() for t, p in zip(torch.split(vector, [p.numel() for p in params]), params)]


def gradient_from_update(before, after, lr: float, model: nn.Module) -> list[torch.Tensor]:
    """The gradient behind one plain SGD step: ``(weights before - weights after) / lr``, per parameter.

    ``before`` and ``after`` are flat weight vectors. After several steps (a local epoch) this is the sum
    of their gradients: the attacks below treat it as one gradient of the whole local data.
    """
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr!r}")
    before, after = split_vector(before, model), split_vector(after, model)
    return [(b - a) / lr for b, a in zip(before, after)]


def gradient_of(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> list[torch.Tensor]:
    """The gradient of the mean cross-entropy loss of ``model`` on a batch, per parameter (what one SGD
    step on that batch uses)."""
    _check_images(images)
    if labels.shape != (len(images),):
        raise ValueError(f"labels must have shape ({len(images)},), got {tuple(labels.shape)}")
    loss = nn.functional.cross_entropy(model(images), labels)
    return [g.detach() for g in torch.autograd.grad(loss, _parameters(model))]


def _check_gradient(gradient: Sequence[torch.Tensor], model: nn.Module) -> list[torch.Tensor]:
    params = _parameters(model)
    shapes = [tuple(g.shape) for g in gradient]
    if len(gradient) != len(params) or any(s != tuple(p.shape) for s, p in zip(shapes, params)):
        raise ValueError(
            f"the gradient does not fit {type(model).__name__}: expected shapes "
            f"{[tuple(p.shape) for p in params]}, got {shapes}"
        )
    return [torch.as_tensor(g).float() for g in gradient]


# --- labels (iDLG) ----------------------------------------------------------------------------------------
def _last_linear(model: nn.Module) -> tuple[nn.Linear, int]:
    params = _parameters(model)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears or linears[-1].bias is None:
        raise ValueError(f"{type(model).__name__} must end with a Linear layer with a bias to infer labels")
    bias = linears[-1].bias
    return linears[-1], next(i for i, p in enumerate(params) if p is bias)


@torch.no_grad()
def infer_labels(gradient: Sequence[torch.Tensor], model: nn.Module, batch_size: int = 1,
                 reference: torch.Tensor | None = None) -> torch.Tensor:
    """The labels of the batch behind ``gradient``, read off the bias gradient of the last layer.

    With cross-entropy, that bias gradient is ``mean(softmax - one_hot)`` over the batch. For one sample,
    its only negative entry is the label (iDLG, exact). For ``batch_size`` samples, the count of label
    ``c`` is about ``batch_size * (mean softmax_c - gradient_c)``; the mean softmax is estimated on
    ``reference`` images (any public digits; uniform 1/classes without them), and the counts are rounded
    to add up to ``batch_size``. Returns the inferred labels, sorted.
    """
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    gradient = _check_gradient(gradient, model)
    layer, index = _last_linear(model)
    g = gradient[index].double()
    if batch_size == 1:
        return g.argmin().reshape(1)
    if reference is not None:
        _check_images(reference, "reference")
        model.eval()
        mean_softmax = torch.softmax(model(reference), 1).mean(0).double()
    else:
        mean_softmax = torch.full_like(g, 1.0 / layer.out_features)
    expected = (batch_size * (mean_softmax - g)).clamp(min=0)
    counts = torch.floor(expected).long()
    remainder = expected - counts
    missing = batch_size - int(counts.sum())
    if missing > 0:  # largest remainders first
        counts[torch.argsort(remainder, descending=True)[:missing]] += 1
    while int(counts.sum()) > batch_size:  # too many: take from the largest overestimates
        excess = torch.where(counts > 0, counts - expected, torch.full_like(expected, -math.inf))
        counts[torch.argmax(excess)] -= 1
    return torch.repeat_interleave(torch.arange(len(counts)), counts)


def label_accuracy(inferred: torch.Tensor, true: torch.Tensor) -> float:
    """Fraction of the true labels that the inferred multiset of labels contains (order does not matter)."""
    inferred, true = torch.as_tensor(inferred), torch.as_tensor(true)
    if len(true) == 0:
        raise ValueError("no true labels to compare with")
    n = max(int(inferred.max()) if len(inferred) else 0, int(true.max())) + 1
    hit = torch.minimum(torch.bincount(inferred, minlength=n), torch.bincount(true, minlength=n)).sum()
    return float(hit) / len(true)


# --- images (DLG with cosine matching and a total-variation prior) ----------------------------------------
def total_variation(images: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference between neighbouring pixels: small for smooth images, large for noise."""
    return (images[..., 1:, :] - images[..., :-1, :]).abs().mean() + \
        (images[..., :, 1:] - images[..., :, :-1]).abs().mean()


def invert_gradient(model: nn.Module, gradient: Sequence[torch.Tensor], labels: torch.Tensor, *,
                    steps: int = 300, lr: float = 0.1, tv: float = 1e-3, seed: int = 0,
                    progress: bool = True, desc: str = "inverting") -> torch.Tensor:
    """Rebuild the images of a batch from its gradient by gradient matching.

    Start from random dummy images with the given (inferred) ``labels``, and move them with Adam so that
    the cosine distance between their gradient and the observed ``gradient`` shrinks, plus ``tv`` times
    their total variation (natural images are smooth). Cosine matching ignores the gradient's scale, so a
    sum of updates or an update scaled by a learning rate works as well. Returns normalized images
    ``(len(labels), 1, 28, 28)``, clamped to valid pixel values.
    """
    target = _check_gradient(gradient, model)
    labels = torch.as_tensor(labels, dtype=torch.int64)
    if labels.ndim != 1 or len(labels) == 0:
        raise ValueError(f"labels must be a non-empty 1-D tensor, got shape {tuple(labels.shape)}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    target_norm = torch.sqrt(sum((t * t).sum() for t in target))
    if not target_norm > 0:
        raise ValueError("the gradient is all zeros: there is nothing to invert")
    model.eval()
    params = _parameters(model)
    generator = torch.Generator().manual_seed(seed)
    dummy = torch.randn((len(labels), 1, 28, 28), generator=generator).clamp_(PIXEL_LOW, PIXEL_HIGH)
    dummy.requires_grad_(True)
    optimizer = torch.optim.Adam([dummy], lr=lr)
    schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, [int(steps * 0.6), int(steps * 0.85)], 0.1)
    for _ in tqdm(range(steps), desc=desc, disable=not progress, leave=False, mininterval=0.5):
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(dummy), labels)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        dot = sum((g * t).sum() for g, t in zip(grads, target))
        norm = torch.sqrt(sum((g * g).sum() for g in grads))
        objective = 1 - dot / (norm * target_norm + 1e-12) + tv * total_variation(dummy)
        objective.backward()
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            dummy.clamp_(PIXEL_LOW, PIXEL_HIGH)
    return dummy.detach()


# --- image quality -----------------------------------------------------------------------------------------
def to_pixels(images: torch.Tensor) -> torch.Tensor:
    """Normalized digits (N, 1, 28, 28) back to pixel intensities in [0, 1]."""
    _check_images(images)
    return (images.float() * MNIST_STD + MNIST_MEAN).clamp(0, 1)


def _pair(reconstructed: torch.Tensor, original: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    _check_images(reconstructed, "reconstructed")
    _check_images(original, "original")
    if reconstructed.shape != original.shape:
        raise ValueError(f"shape mismatch: reconstructed {tuple(reconstructed.shape)}, "
                         f"original {tuple(original.shape)}")
    return to_pixels(reconstructed), to_pixels(original)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    offsets = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    window = torch.exp(-offsets**2 / (2 * sigma**2))
    return window / window.sum()


def _blur(images: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Gaussian-weighted local means around every pixel (borders mirrored)."""
    k = len(window)
    images = nn.functional.pad(images, [(k - 1) // 2] * 4, mode="reflect")
    out = nn.functional.conv2d(images, window.view(1, 1, k, 1))
    return nn.functional.conv2d(out, window.view(1, 1, 1, k))


def ssim(reconstructed: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004) of each pair of normalized digits, in pixel space [0, 1].

    1 means identical; around 0 means unrelated (noise). The standard parameters: an 11x11 Gaussian
    window with sigma 1.5, K1 = 0.01, K2 = 0.03, averaged over every pixel with mirrored borders, as
    torchmetrics computes it (the tests compare the two; importing torchmetrics would cost a notebook
    260 MB). Returns one value per image.
    """
    x, y = _pair(reconstructed, original)
    window = _gaussian_window()
    return torch.cat([_ssim(x[i:i + 256].double(), y[i:i + 256].double(), window)  # in chunks: memory
                      for i in range(0, len(x), 256)])


def _ssim(x: torch.Tensor, y: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    c1, c2 = 0.01**2, 0.03**2  # (K * data range)^2, data range 1
    mu_x, mu_y = _blur(x, window), _blur(y, window)
    var_x = (_blur(x * x, window) - mu_x**2).clamp(min=0)
    var_y = (_blur(y * y, window) - mu_y**2).clamp(min=0)
    cov = _blur(x * y, window) - mu_x * mu_y
    index = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return index.mean(dim=(1, 2, 3)).float()


def psnr(reconstructed: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB of each pair of normalized digits, in pixel space (peak 1):
    ``10 log10(1 / mean squared error)``; infinite for identical images."""
    x, y = _pair(reconstructed, original)
    mse = ((x.double() - y.double()) ** 2).mean(dim=(1, 2, 3))
    return (10 * torch.log10(1 / mse)).float()


def match_reconstructions(reconstructed: torch.Tensor,
                          original: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pair each original digit with one reconstruction (the attack does not know the order).

    Solves the assignment that maximises the total SSIM (Hungarian method); reconstructions may be fewer
    or more than originals (then some originals, or reconstructions, stay unpaired: their SSIM is 0).
    Returns ``(index of the reconstruction paired with each original or -1, SSIM of each original)``.
    """
    from scipy.optimize import linear_sum_assignment

    _check_images(reconstructed, "reconstructed")
    _check_images(original, "original")
    r, o = len(reconstructed), len(original)
    scores = ssim(reconstructed.repeat_interleave(o, 0), original.repeat(r, 1, 1, 1)).reshape(r, o)
    rows, cols = linear_sum_assignment(scores.numpy(), maximize=True)
    index, quality = torch.full((o,), -1), torch.zeros(o)
    index[cols], quality[cols] = torch.as_tensor(rows), scores[rows, cols]
    return index, quality


def same_class_ssim(images: torch.Tensor, labels: torch.Tensor, pairs: int = 2000, seed: int = 0):
    """SSIM between two *different* digits of the same class, for ``pairs`` random pairs.

    The yardstick for a reconstruction: one that resembles the owner's digit more than almost any other
    writer's digit of the same class did rebuild *that* digit, not just "a 3".
    """
    _check_images(images)
    labels = torch.as_tensor(labels)
    rng = np.random.default_rng(seed)
    by_class = [np.flatnonzero(labels.numpy() == c) for c in np.unique(labels.numpy())]
    by_class = [idx for idx in by_class if len(idx) >= 2]
    if not by_class:
        raise ValueError("need at least two digits of one class")
    first, second = [], []
    for _ in range(pairs):
        idx = by_class[rng.integers(len(by_class))]
        a, b = rng.choice(idx, 2, replace=False)
        first.append(a)
        second.append(b)
    return ssim(images[first], images[second])


# --- membership inference -----------------------------------------------------------------------------------
@torch.no_grad()
def _logits(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000):
    _check_images(images)
    labels = torch.as_tensor(labels)
    if labels.shape != (len(images),):
        raise ValueError(f"labels must have shape ({len(images)},), got {tuple(labels.shape)}")
    model.eval()
    return torch.cat([model(images[i:i + batch_size]) for i in range(0, len(images), batch_size)]), labels


def loss_scores(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """The loss-threshold attack (Yeom et al. 2018): score = minus the sample's loss.

    Training drives the loss of members down, so a higher score means "more likely a member".
    """
    logits, labels = _logits(model, images, labels)
    return -nn.functional.cross_entropy(logits, labels, reduction="none").double().numpy()


def confidences(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """LiRA's statistic per sample: ``log(p / (1 - p))`` of the true label's probability ``p``.

    Computed from logits as ``logit_y - logsumexp(other logits)``, which stays exact where ``p`` rounds to 1.
    Its distribution over training runs is close to Gaussian.
    """
    logits, labels = _logits(model, images, labels)
    logits = logits.double()
    true = logits.gather(1, labels[:, None])[:, 0]
    others = logits.scatter(1, labels[:, None], -math.inf)
    return (true - torch.logsumexp(others, 1)).numpy()


def shadow_confidences(train: Callable[[torch.Tensor, torch.Tensor, int], nn.Module],
                       images: torch.Tensor, labels: torch.Tensor, n_shadows: int, seed: int = 0,
                       progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Train ``n_shadows`` shadow models, each on a random half of ``(images, labels)``.

    ``train(images, labels, seed)`` must return a model trained the way the target was. Every sample is
    in the training set of half the shadows (an even ``n_shadows`` splits each sample exactly in half).
    Returns ``(confidences (n_shadows, N), membership mask (n_shadows, N))``.
    """
    _check_images(images)
    if not isinstance(n_shadows, int) or n_shadows < 2 or n_shadows % 2:
        raise ValueError(f"n_shadows must be an even integer >= 2, got {n_shadows!r}")
    n = len(images)
    rng = np.random.default_rng(seed)
    # each sample is IN for exactly half of the shadows: a random permutation of a balanced column
    column = np.arange(n_shadows) < n_shadows // 2
    inside = np.stack([rng.permutation(column) for _ in range(n)], axis=1)
    scores = np.zeros((n_shadows, n))
    for k in tqdm(range(n_shadows), desc="shadow models", disable=not progress, mininterval=0.5):
        members = torch.from_numpy(np.flatnonzero(inside[k]))
        model = train(images[members], labels[members], seed + 1 + k)
        scores[k] = confidences(model, images, labels)
    return scores, inside


def lira_scores(target: np.ndarray, shadows: np.ndarray, inside: np.ndarray,
                global_variance: bool = True) -> np.ndarray:
    """Likelihood-ratio membership scores (LiRA, Carlini et al. 2022, online version).

    For each sample, fit one Gaussian to its confidence in the shadows that trained on it and one to the
    shadows that did not; the score is the log-likelihood ratio of the target's confidence. With few
    shadows, one variance shared by all samples (``global_variance``) is more stable, as LiRA recommends.
    """
    target, shadows, inside = np.asarray(target, float), np.asarray(shadows, float), np.asarray(inside, bool)
    if shadows.ndim != 2 or shadows.shape != inside.shape or target.shape != (shadows.shape[1],):
        raise ValueError(f"shape mismatch: target {target.shape}, shadows {shadows.shape}, "
                         f"inside {inside.shape} (expected (N,), (K, N), (K, N))")
    if (inside.sum(0) < 1).any() or ((~inside).sum(0) < 1).any():
        raise ValueError("every sample needs at least one shadow that trained on it and one that did not")
    mean_in = np.nanmean(np.where(inside, shadows, np.nan), 0)
    mean_out = np.nanmean(np.where(~inside, shadows, np.nan), 0)
    if global_variance:
        std_in = np.full_like(mean_in, np.nanstd(np.where(inside, shadows - mean_in, np.nan)))
        std_out = np.full_like(mean_out, np.nanstd(np.where(~inside, shadows - mean_out, np.nan)))
    else:
        std_in = np.nanstd(np.where(inside, shadows, np.nan), 0)
        std_out = np.nanstd(np.where(~inside, shadows, np.nan), 0)
    std_in, std_out = np.maximum(std_in, 1e-6), np.maximum(std_out, 1e-6)

    def log_normal(x, mean, std):
        return -0.5 * ((x - mean) / std) ** 2 - np.log(std)

    return log_normal(target, mean_in, std_in) - log_normal(target, mean_out, std_out)


# --- ROC, AUC, TPR at low FPR, and the DP bound -----------------------------------------------------------
def _scores(members, non_members) -> tuple[np.ndarray, np.ndarray]:
    members, non_members = np.asarray(members, float).ravel(), np.asarray(non_members, float).ravel()
    if len(members) == 0 or len(non_members) == 0:
        raise ValueError(f"need scores of members and non-members, got {len(members)} and {len(non_members)}")
    if not (np.isfinite(members).all() and np.isfinite(non_members).all()):
        raise ValueError("membership scores must be finite numbers")
    return members, non_members


def roc_curve(members, non_members) -> tuple[np.ndarray, np.ndarray]:
    """``(FPR, TPR)`` of the attack "member if score >= t", for every threshold t, from (0, 0) to (1, 1)."""
    members, non_members = _scores(members, non_members)
    thresholds = np.unique(np.concatenate([members, non_members]))[::-1]
    tpr = (members[None, :] >= thresholds[:, None]).mean(1) if len(thresholds) < 20000 else None
    if tpr is None:  # pragma: no cover - large inputs: the same by sorting
        tpr = 1 - np.searchsorted(np.sort(members), thresholds, side="left") / len(members)
    fpr = 1 - np.searchsorted(np.sort(non_members), thresholds, side="left") / len(non_members)
    return np.concatenate([[0.0], fpr]), np.concatenate([[0.0], tpr])


def roc_auc(members, non_members) -> float:
    """Area under the ROC curve: the chance that a random member scores above a random non-member
    (ties count half). 0.5 is guessing, 1 is a perfect attack."""
    from scipy.stats import rankdata

    members, non_members = _scores(members, non_members)
    ranks = rankdata(np.concatenate([members, non_members]))
    m, n = len(members), len(non_members)
    return float((ranks[:m].sum() - m * (m + 1) / 2) / (m * n))


def auc_margin(n_members: int, n_non_members: int, sigmas: float = 3.0) -> float:
    """How far from 0.5 the AUC of a *guessing* attack may land by chance: ``sigmas`` standard deviations
    of the Mann-Whitney statistic, ``sqrt((m + n + 1) / (12 m n))``."""
    if n_members < 1 or n_non_members < 1:
        raise ValueError("need at least one member and one non-member")
    m, n = n_members, n_non_members
    return sigmas * math.sqrt((m + n + 1) / (12 * m * n))


def _check_fpr(fpr) -> np.ndarray:
    fpr = np.asarray(fpr, float)
    if not ((fpr > 0) & (fpr < 1)).all():
        raise ValueError(f"false-positive rates must lie strictly between 0 and 1, got {fpr}")
    return fpr


def tpr_at_fpr(members, non_members, fpr: float) -> float:
    """The attack's true-positive rate at the lowest threshold whose false-positive rate is at most ``fpr``.

    With ``n`` non-members, FPRs below ``1/n`` can only be measured as 0: use at least ``10 / fpr``.
    """
    _check_fpr(fpr)
    fprs, tprs = roc_curve(members, non_members)
    return float(tprs[fprs <= fpr].max())


def dp_tpr_bound(fpr, epsilon: float, delta: float):
    """The highest TPR any membership attack can reach at false-positive rate ``fpr`` against an
    (epsilon, delta)-DP training: ``TPR <= e^epsilon * FPR + delta``, and, from the other side of the
    definition, ``1 - FPR <= e^epsilon * (1 - TPR) + delta``; capped at 1 (Kairouz et al. 2015)."""
    fpr = _check_fpr(fpr)
    if not (math.isfinite(epsilon) and epsilon >= 0):
        raise ValueError(f"epsilon must be a non-negative number, got {epsilon!r}")
    if not 0 <= delta < 1:
        raise ValueError(f"delta must be in [0, 1), got {delta!r}")
    bound = np.minimum(np.exp(epsilon) * fpr + delta, 1 - np.exp(-epsilon) * (1 - delta - fpr))
    bound = np.minimum(bound, 1.0)
    return float(bound) if bound.ndim == 0 else bound


def binomial_margin(rate: float, n: int, sigmas: float = 3.0) -> float:
    """Sampling margin of a rate measured on ``n`` samples: ``sigmas`` standard deviations of a binomial
    proportion, never below ``sigmas / n`` (one more hit out of ``n`` at rates near 0)."""
    if n < 1:
        raise ValueError(f"need at least one sample, got n={n}")
    return sigmas * max(math.sqrt(rate * (1 - rate) / n), 1 / n)


# --- one membership experiment -----------------------------------------------------------------------------
@dataclass
class MembershipAttack:
    """Both membership attacks on one target model; ``member[i]`` says whether sample ``i`` trained it."""

    member: np.ndarray
    scores: dict[str, np.ndarray]
    accuracy: float
    model: nn.Module

    def _split(self, attack: str):
        if attack not in self.scores:
            raise ValueError(f"unknown attack {attack!r}; measured: {sorted(self.scores)}")
        return self.scores[attack][self.member], self.scores[attack][~self.member]

    def auc(self, attack: str) -> float:
        return roc_auc(*self._split(attack))

    def tpr(self, attack: str, fpr: float) -> float:
        return tpr_at_fpr(*self._split(attack), fpr)

    def roc(self, attack: str) -> tuple[np.ndarray, np.ndarray]:
        return roc_curve(*self._split(attack))


def attack_membership(train: Callable[[torch.Tensor, torch.Tensor, int], nn.Module], images: torch.Tensor,
                      labels: torch.Tensor, test: tuple[torch.Tensor, torch.Tensor], n_shadows: int = 8,
                      seed: int = 0, progress: bool = True) -> MembershipAttack:
    """Train a target on a random half of ``(images, labels)`` with ``train(images, labels, seed)``, then
    attack it: the loss threshold, and LiRA with ``n_shadows`` shadow models trained the same way.

    The other half are the non-members, drawn from the same distribution. ``test`` gives the target's
    test accuracy.
    """
    from .training import evaluate

    _check_images(images)
    member = np.random.default_rng(seed).permutation(len(images)) < len(images) // 2
    target = train(images[torch.from_numpy(member)], labels[torch.from_numpy(member)], seed)
    shadows, inside = shadow_confidences(train, images, labels, n_shadows, seed=seed + 1, progress=progress)
    scores = {"loss threshold": loss_scores(target, images, labels),
              "LiRA": lira_scores(confidences(target, images, labels), shadows, inside)}
    return MembershipAttack(member, scores, evaluate(target, *test)[0], target)


# --- what each protection costs an owner per round ----------------------------------------------------------
def _best_time(function: Callable[[], object], repeat: int) -> tuple[float, object]:
    best, result = math.inf, None
    for _ in range(repeat):
        tic = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - tic)
    return best, result


def round_costs(local_update: Callable[[bool], torch.Tensor], n_samples: int, n_owners: int = 3,
                repeat: int = 3) -> dict[str, dict[str, float]]:
    """Seconds and bytes one owner spends per round with each protection of the series, without syft.

    ``local_update(dp)`` runs one owner's local training (DP-SGD when ``dp``) and returns the flat weight
    vector it would send. Pairwise masks and CKKS are timed on that vector with ``n_owners`` owners: the
    owner's own work plus its share (1 / n_owners) of the aggregator's. Bytes are what one owner sends.
    Fastest of ``repeat`` runs (a busy machine only ever adds time).
    """
    from . import encryption as he
    from . import secret_sharing as ss

    plain_seconds, vector = _best_time(lambda: local_update(False), repeat)
    dp_seconds, _ = _best_time(lambda: local_update(True), repeat)
    vector = np.asarray(vector, dtype=np.float64)
    keys = {f"owner{i}": ss.generate_keypair() for i in range(n_owners)}
    public = {name: pk for name, (_, pk) in keys.items()}

    def masked_round():
        masked = {name: ss.mask(ss.encode_weighted(vector, n_samples), name, sk, public, 0)
                  for name, (sk, _) in keys.items()}
        ss.decode_weighted_average(ss.unmask_sum(masked, list(keys), 0))
        return masked["owner0"].nbytes

    context = he.make_context()
    public_context = he.public_context(context)

    def ckks_round():
        sent = [he.encrypt_weighted(public_context, vector, n_samples).to_bytes() for _ in range(n_owners)]
        total = he.aggregate([he.EncryptedVector.from_bytes(public_context, c) for c in sent])
        he.decrypt_weighted_average(total, context)
        return len(sent[0])

    mask_seconds, mask_bytes = _best_time(masked_round, repeat)
    ckks_seconds, ckks_bytes = _best_time(ckks_round, 1)
    plain_bytes = vector.size * 4  # float32 weights
    costs = {
        "plain FedAvg": (plain_seconds, plain_bytes),
        "FedAvg + DP": (dp_seconds, plain_bytes),
        "secure aggregation (masks)": (plain_seconds + mask_seconds / n_owners, mask_bytes),
        "CKKS": (plain_seconds + ckks_seconds / n_owners, ckks_bytes),
        "DP + secure aggregation": (dp_seconds + mask_seconds / n_owners, mask_bytes),
    }
    return {name: {"seconds": s, "bytes": b, "time vs plain": s / plain_seconds,
                   "bytes vs plain": b / plain_bytes} for name, (s, b) in costs.items()}
