"""What a trained model leaks: membership inference (loss threshold, LiRA) and how to read its ROC.

* scores: :func:`loss_scores` (Yeom et al. 2018), :func:`shadow_confidences` and :func:`lira_scores`
  (online LiRA with a global variance, Carlini et al. 2022, sized for a laptop)
* :func:`attack_membership` runs both on one target model (trained by a function you give)
* targets: :func:`overfit_trainer` (an MLP that memorises its 500 digits), :func:`dp_trainer` (a linear model
  on ScatterNet features trained with DP-SGD, Tramer & Boneh 2021) and :func:`matched_trainer` (the same
  model without DP, stopped at a given test accuracy): Part 6 and ``benchmarks/privacy_table.py`` share them
* ROC: :func:`roc_curve`, :func:`roc_auc`, :func:`tpr_at_fpr`, and the sampling margins
  :func:`auc_margin` and :func:`binomial_margin`; the most any attack can reach against a DP training is
  :func:`secure_ai.privacy.dp_tpr_bound`, and the least epsilon a measured attack proves is
  :func:`empirical_epsilon`

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
    if not isinstance(n_shadows, int) or n_shadows < 4 or n_shadows % 2:
        raise ValueError(f"n_shadows must be an even integer >= 4 (LiRA's pooled variance needs 2 'in' and 2 "
                         f"'out' shadows per sample), got {n_shadows!r}")
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
    shadows, one variance shared by all samples (``global_variance``: the standard deviation of every
    shadow's residual from its sample's mean, pooled over all samples, once for "in" and once for "out") is
    more stable, as LiRA recommends; it needs at least 2 "in" and 2 "out" shadows per sample (with one each,
    every residual is 0).
    """
    target, shadows, inside = np.asarray(target, float), np.asarray(shadows, float), np.asarray(inside, bool)
    if shadows.ndim != 2 or shadows.shape != inside.shape or target.shape != (shadows.shape[1],):
        raise ValueError(f"shape mismatch: target {target.shape}, shadows {shadows.shape}, "
                         f"inside {inside.shape} (expected (N,), (K, N), (K, N))")
    if (inside.sum(0) < 1).any() or ((~inside).sum(0) < 1).any():
        raise ValueError("every sample needs at least one shadow that trained on it and one that did not")
    if global_variance and ((inside.sum(0) < 2).any() or ((~inside).sum(0) < 2).any()):
        raise ValueError("a pooled variance needs at least 2 'in' and 2 'out' shadows per sample: use "
                         "n_shadows >= 4")
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
    """Both membership attacks on one target model; ``member[i]`` says whether sample ``i`` trained it.

    ``confidence`` is the target's LiRA statistic per sample, ``shadows`` the shadow models' (one row per
    shadow) and ``inside[k, i]`` whether sample ``i`` trained shadow ``k``.
    """

    member: np.ndarray
    scores: dict[str, np.ndarray]
    accuracy: float
    model: nn.Module
    confidence: np.ndarray
    shadows: np.ndarray
    inside: np.ndarray

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

    def empirical_epsilon(self, attack: str, delta: float) -> float:
        """The least epsilon this attack proves with 95% confidence (:func:`empirical_epsilon`)."""
        return empirical_epsilon(*self._split(attack), delta)


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
    confidence = confidences(target, images, labels)
    scores = {"loss threshold": loss_scores(target, images, labels),
              "LiRA": lira_scores(confidence, shadows, inside)}
    return MembershipAttack(member, scores, evaluate(target, *test)[0], target, confidence, shadows, inside)


# --- the targets: how Part 6 and benchmarks/privacy_table.py train them ------------------------------------
Trainer = Callable[[torch.Tensor, torch.Tensor, int], nn.Module]


def overfit_trainer(hidden: int = 128, epochs: int = 30, lr: float = 0.05) -> Trainer:
    """``train(images, labels, seed)``: an MLP trained without DP long enough to memorise its digits (100%
    training accuracy on 500): the target that leaks most."""
    from .training import MLP, set_seed, train_epoch

    def train(images, labels, seed):
        set_seed(seed)
        net = MLP(hidden=hidden)
        optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
        for epoch in range(epochs):
            train_epoch(net, images, labels, optimizer, batch_size=32, seed=seed * 100 + epoch,
                        progress=False)
        return net

    return train


def scatter_net():
    """The ScatterNet the feature targets share (:class:`secure_ai.features.ScatterNet`, compact, memoised:
    each digit's features are computed once for all the shadow models). Free it with ``.memo.clear()``."""
    from .features import ScatterNet

    global _SCATTER
    if _SCATTER is None:
        _SCATTER = ScatterNet(compact=True, memo=True)
    return _SCATTER


_SCATTER = None


def dp_trainer(epsilon: float, steps: int = 30, lr: float = 0.1, clip: float = 1.0) -> tuple[Trainer, dict]:
    """``(train, state)``: a linear model on ScatterNet features trained with DP-SGD (Tramer & Boneh 2021), in
    ``steps`` full-batch steps clipped to ``clip``.

    The first model trained (the target) gets the noise for ``epsilon`` (PRV accountant, delta 1e-5); every
    later one (its shadows) reuses that noise. ``state`` then holds ``sigma`` and the ``epsilon`` spent. The
    model returned classifies digits: ``nn.Sequential(scatter_net(), head)``.
    """
    from .dp_sgd import make_private
    from .features import linear_head
    from .training import set_seed

    state = {}

    def train(images, labels, seed):
        set_seed(seed)
        head = linear_head()
        optimizer = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9)
        budget = ({"noise_multiplier": state["sigma"]} if state  # the shadows: the target's noise
                  else {"target_epsilon": epsilon, "epochs": steps})
        # seeded as before (a simulation on public digits); an owner's DP-SGD leaves the generator to the OS
        run = make_private(head, optimizer, scatter_net()(images), labels.long(), batch_size=len(labels),
                           max_grad_norm=clip, generator=torch.Generator().manual_seed(seed), **budget)
        for _ in range(steps):  # sample rate 1: one step per epoch
            run.train_epoch(progress=False)
        if "sigma" not in state:  # the target: its noise and the epsilon it spent
            state.update(sigma=run.noise_multiplier, epsilon=run.epsilon())
        return nn.Sequential(scatter_net(), head)

    return train, state


def matched_trainer(accuracy: float, test: tuple[torch.Tensor, torch.Tensor], max_steps: int = 500,
                    lr: float = 0.01) -> Trainer:
    """``train(images, labels, seed)``: :func:`dp_trainer`'s model trained without DP (full-batch SGD, small
    steps) and stopped at the first step whose accuracy on ``test`` reaches ``accuracy``: the DP model's
    utility without its privacy, so that a membership attack compares privacy, not how much was learnt."""
    from .features import accuracy as head_accuracy
    from .features import linear_head
    from .training import set_seed

    def train(images, labels, seed):
        test_features, test_labels = scatter_net()(test[0]), test[1].long()
        set_seed(seed)
        head = linear_head()
        optimizer = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9)
        features, labels = scatter_net()(images), labels.long()
        for _ in range(max_steps):
            if head_accuracy(head, test_features, test_labels) >= accuracy:
                break
            head.train()
            optimizer.zero_grad()
            nn.functional.cross_entropy(head(features), labels).backward()
            optimizer.step()
        return nn.Sequential(scatter_net(), head)

    return train


# --- what an attack proves: an empirical lower bound on epsilon ---------------------------------------------
def _proven_epsilon(tp, fp, m: int, n: int, level: float, delta: float) -> np.ndarray:
    """The epsilon that ``tp`` of ``m`` members and ``fp`` of ``n`` non-members above a threshold prove, from
    one-sided Clopper-Pearson bounds at ``level`` on TPR, FPR, TNR and FNR (-inf where they prove nothing)."""
    from scipy.special import betaincinv

    tp, fp = np.asarray(tp, float), np.asarray(fp, float)
    tn, fn = n - fp, m - tp
    low = lambda k, total: np.where(k > 0, betaincinv(np.maximum(k, 1), total - k + 1, level), 0.0)
    high = lambda k, total: np.where(k < total, betaincinv(k + 1, np.maximum(total - k, 1), 1 - level), 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        proofs = [np.where(hit > delta, np.log((hit - delta) / miss), -np.inf)
                  for hit, miss in ((low(tp, m), high(fp, n)), (low(tn, n), high(fn, m)))]
    return np.maximum(*proofs)


def empirical_epsilon(member_scores, non_member_scores, delta: float, *, alpha: float = 0.05,
                      seed: int = 0) -> float:
    """The least epsilon a measured attack proves, with confidence ``1 - alpha`` (Jagielski et al. 2020).

    Members and non-members are split in halves (``seed``). On the first halves the threshold that proves
    the most is chosen; on the second, its true and false positives are counted. One-sided Clopper-Pearson
    bounds (at ``alpha / 2`` each, for the two inequalities) give a lowest TPR and a highest FPR, and likewise
    for the complements, and an (epsilon, delta)-DP training forces ``TPR <= e^eps FPR + delta`` and
    ``TNR <= e^eps FNR + delta``. Returns ``max(0, the largest epsilon those bounds force)``.

    A sanity check with little power, not an audit: with a few hundred records even a perfect attack proves
    only about 4, and the records of one training run are not independent trials (Steinke, Nasr and
    Jagielski 2023 give the sound one-run analysis).
    """
    members, non_members = _scores(member_scores, non_member_scores)
    if not 0 < alpha < 1 or not 0 <= delta < 1:
        raise ValueError(f"need 0 < alpha < 1 and 0 <= delta < 1, got {alpha} and {delta}")
    if min(len(members), len(non_members)) < 4:
        raise ValueError("need at least 4 members and 4 non-members (two halves of each)")
    rng = np.random.default_rng(seed)
    halves = (np.array_split(rng.permutation(scores), 2) for scores in (members, non_members))
    (pick_m, count_m), (pick_n, count_n) = halves
    values = np.unique(np.concatenate([pick_m, pick_n]))
    thresholds = np.concatenate([[values[0] - 1], (values[1:] + values[:-1]) / 2])  # between neighbours
    count = lambda scores, t: (scores[None, :] > t[:, None]).sum(1)
    level = alpha / 2
    proofs = _proven_epsilon(count(pick_m, thresholds), count(pick_n, thresholds), len(pick_m), len(pick_n),
                             level, delta)
    best = thresholds[np.argmax(proofs)]
    proven = _proven_epsilon((count_m > best).sum(), (count_n > best).sum(), len(count_m), len(count_n),
                             level, delta)
    return max(0.0, float(proven))
