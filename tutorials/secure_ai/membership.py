"""What a trained model leaks: membership inference (loss threshold, LiRA) and how to read its ROC.

* scores: :func:`loss_scores` (Yeom et al. 2018), :func:`shadow_confidences` and :func:`lira_scores`
  (a small likelihood-ratio attack in the spirit of LiRA, Carlini et al. 2022)
* :func:`attack_membership` runs both on one target model (trained by a function you give)
* ROC: :func:`roc_curve`, :func:`roc_auc`, :func:`tpr_at_fpr`, and the sampling margins
  :func:`auc_margin` and :func:`binomial_margin`; the most any attack can reach against a DP training is
  :func:`secure_ai.privacy.dp_tpr_bound`

Everything is seeded: the same inputs give the same numbers.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .data import check_images
from .privacy import check_fpr


# --- membership inference -----------------------------------------------------------------------------------
@torch.no_grad()
def _logits(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000):
    check_images(images)
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
    check_images(images)
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


# --- ROC, AUC, TPR at low FPR -----------------------------------------------------------
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


def tpr_at_fpr(members, non_members, fpr: float) -> float:
    """The attack's true-positive rate at the lowest threshold whose false-positive rate is at most ``fpr``.

    With ``n`` non-members, FPRs below ``1/n`` can only be measured as 0: use at least ``10 / fpr``.
    """
    check_fpr(fpr)
    fprs, tprs = roc_curve(members, non_members)
    return float(tprs[fprs <= fpr].max())


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

    check_images(images)
    member = np.random.default_rng(seed).permutation(len(images)) < len(images) // 2
    target = train(images[torch.from_numpy(member)], labels[torch.from_numpy(member)], seed)
    shadows, inside = shadow_confidences(train, images, labels, n_shadows, seed=seed + 1, progress=progress)
    scores = {"loss threshold": loss_scores(target, images, labels),
              "LiRA": lira_scores(confidences(target, images, labels), shadows, inside)}
    return MembershipAttack(member, scores, evaluate(target, *test)[0], target)

