"""What one shared update leaks: its gradient, the labels of its batch, and the digits themselves.

* updates: :func:`gradient_from_update` turns a one-step SGD update into the gradient it was made of
* labels: :func:`infer_labels` reads the labels of a batch off the last layer's gradient (iDLG, Zhao et
  al. 2020; with counts for larger batches, as in Wainakh et al. 2022)
* images: :func:`invert_gradient` optimises dummy digits until their gradient matches (DLG, Zhu et al. 2019,
  with the cosine distance and total-variation prior of Geiping et al. 2020)
* grading: :func:`identify` says whether a reconstruction singles out its digit among a pool of digits of
  the same class (DP review 5.3); :func:`grade_reconstructions` pairs reconstructions with the originals
  (:func:`match_reconstructions`) and reports identification, PSNR and SSIM (:func:`psnr`, :func:`ssim`)

What a trained model leaks (membership inference) is in :mod:`secure_ai.membership`. Everything is seeded:
the same inputs give the same numbers.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .data import MNIST_MEAN, MNIST_STD, check_images

PIXEL_LOW, PIXEL_HIGH = (0.0 - MNIST_MEAN) / MNIST_STD, (1.0 - MNIST_MEAN) / MNIST_STD  # normalized range


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
    check_images(images)
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
        check_images(reference, "reference")
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
    check_images(images)
    return (images.float() * MNIST_STD + MNIST_MEAN).clamp(0, 1)


def _pair(reconstructed: torch.Tensor, original: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    check_images(reconstructed, "reconstructed")
    check_images(original, "original")
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


def _pixel_rows(images) -> np.ndarray:
    """Digits as float64 rows of pixel intensities: raw uint8 (N, 28, 28) / 255, or normalized floats
    (N, 1, 28, 28) mapped back without clipping (an affine map: it keeps every ranking by distance)."""
    if isinstance(images, np.ndarray) and images.dtype == np.uint8 or (
            isinstance(images, torch.Tensor) and images.dtype == torch.uint8):
        rows = np.asarray(images, dtype=np.float64) / 255.0
    else:
        array = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
        rows = array.astype(np.float64) * MNIST_STD + MNIST_MEAN
    if rows.ndim < 2 or rows[0].size != 28 * 28:
        raise ValueError(f"expected digits of 784 pixels, got shape {rows.shape}")
    return np.nan_to_num(rows.reshape(len(rows), -1), nan=1e6, posinf=1e6, neginf=-1e6)


def identify(reconstructed, original, labels, pool_images, pool_labels) -> tuple[np.ndarray, np.ndarray]:
    """Does each reconstruction point to *its* digit, not just to the class? ``(identified, rank)``.

    ``reconstructed[i]`` is paired with ``original[i]`` of class ``labels[i]``. The pool holds other digits
    (say MNIST's test set, about 1,000 per class, which no owner holds). A reconstruction **identifies** its
    digit when it is closer to it (mean squared error in pixel space) than to every pool digit of the same
    class; ``rank`` is 1 plus the number of those pool digits at least as close. A guess, an all-black
    image or the class's average image is identified about once in a thousand. Images are raw uint8 or
    normalized; a pool digit equal to the original (the pool holds it) does not count.
    """
    found, true, pool = _pixel_rows(reconstructed), _pixel_rows(original), _pixel_rows(pool_images)
    labels, pool_labels = np.asarray(labels).ravel(), np.asarray(pool_labels).ravel()
    if not len(found) == len(true) == len(labels) or len(pool) != len(pool_labels):
        raise ValueError(f"need as many reconstructions, originals and labels ({len(found)}, {len(true)}, "
                         f"{len(labels)}), and a label per pool digit ({len(pool)}, {len(pool_labels)})")
    rank = np.ones(len(found), dtype=np.int64)
    for c in np.unique(labels):
        rows, others = np.flatnonzero(labels == c), pool[pool_labels == c]
        if len(others) == 0:
            raise ValueError(f"the pool holds no digit of class {c}: nothing to tell the digit apart from")
        norms = (others ** 2).sum(1)[None]
        squared = (found[rows] ** 2).sum(1)[:, None] + norms - 2 * found[rows] @ others.T
        itself = (true[rows] ** 2).sum(1)[:, None] + norms - 2 * true[rows] @ others.T < 1e-9  # in the pool
        own = ((found[rows] - true[rows]) ** 2).sum(1)[:, None]
        rank[rows] += ((squared <= own + 1e-9 * (1 + own)) & ~itself).sum(1)
    return rank == 1, rank


def match_reconstructions(reconstructed: torch.Tensor,
                          original: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pair each original digit with one reconstruction (the attack does not know the order).

    Solves the assignment with the least total mean squared error (Hungarian method), the attacker's best
    case. With fewer reconstructions than originals, the originals left over are paired with an all-black
    image (index -1). Returns ``(index of the reconstruction paired with each original, or -1; its PSNR)``.
    """
    from scipy.optimize import linear_sum_assignment

    check_images(reconstructed, "reconstructed")
    check_images(original, "original")
    x, y = to_pixels(reconstructed).double().flatten(1), to_pixels(original).double().flatten(1)
    squared = ((y[:, None, :] - x[None, :, :]) ** 2).mean(2)      # originals x reconstructions
    rows, cols = linear_sum_assignment(squared.numpy())
    index = torch.full((len(original),), -1)
    index[torch.as_tensor(rows)] = torch.as_tensor(cols)
    mse = (y ** 2).mean(1)                                         # an all-black image, for the unpaired
    mse[torch.as_tensor(rows)] = squared[rows, cols]
    return index, (10 * torch.log10(1 / mse)).float()


@dataclass
class Graded:
    """A batch of reconstructions graded against the owner's digits (:func:`grade_reconstructions`)."""

    summary: dict            # label accuracy, identified, digits, median rank, mean/best PSNR, mean/best SSIM
    paired: torch.Tensor     # the reconstruction paired with each original (all-black where none)
    psnr: torch.Tensor       # of each original with its reconstruction, dB
    identified: np.ndarray   # each original: singled out among the pool digits of its class


def grade_reconstructions(guessed, rebuilt: torch.Tensor, original: torch.Tensor, true_labels,
                          pool_images, pool_labels) -> Graded:
    """Owner side: how much of a batch an attack gave back.

    Pairs each original with a reconstruction (:func:`match_reconstructions`), then reports the share of
    labels the attacker read right (``guessed`` against ``true_labels``), how many digits are identified
    among the pool (:func:`identify`), the median rank, and mean and best PSNR and SSIM.
    """
    index, quality = match_reconstructions(rebuilt, original)
    black = torch.full_like(original[:1], PIXEL_LOW)
    paired = torch.cat([rebuilt, black])[index]                    # index -1: the all-black image
    identified, rank = identify(paired, original, true_labels, pool_images, pool_labels)
    similarity = ssim(paired, original)
    summary = {"label accuracy": label_accuracy(torch.as_tensor(guessed), torch.as_tensor(true_labels)),
               "identified": int(identified.sum()), "digits": len(original),
               "median rank": float(np.median(rank)), "mean PSNR": quality.mean().item(),
               "best PSNR": quality.max().item(), "mean SSIM": similarity.mean().item(),
               "best SSIM": similarity.max().item()}
    return Graded(summary, paired, quality, identified)
