"""DP-SGD with Opacus: a model it can train, and a loop that counts its steps and reports its epsilon.

* :class:`TanhCNN` (Papernot et al. 2021) and :func:`check_compatible` (names the fix for a BatchNorm model)
* :func:`make_private` wraps a model, an optimizer and tensors (digits, or 2-D feature tensors such as
  :mod:`secure_ai.features` computes) with Opacus and returns a :class:`PrivateTraining` whose loop counts
  its (logical) steps and reports the accountant's epsilon; :func:`accuracy` of a model on either kind
* :func:`os_generator`: the source of the Poisson sampling and of the noise, seeded by the operating system

Two things Opacus leaves to its user are fixed here, because an owner runs DP-SGD on weights the data
scientist chose, in a process whose torch generator the data scientist may have seeded (Part 3):

* randomness: sampling and noise never come from torch's global generator (``torch.manual_seed`` sets it),
  but from a generator seeded with 64 bits from ``secrets`` for each :func:`make_private` (DP review 3.11);
* non-finite gradients: crafted, finite weights can make one record's gradient overflow; Opacus would then
  turn the whole noisy sum into NaN, and whether the weights come back NaN would tell whether that record
  was sampled (DP review 3.9). Here a record whose per-sample gradient is not finite, or whose norm
  overflows, adds zero: a contribution within the clipping norm, like any other.

The accounting itself (:func:`secure_ai.privacy.epsilon_spent`) is in :mod:`secure_ai.privacy`, as Opacus
keeps its accountants apart from its privacy engine. Opacus's warnings are silenced here.
"""
from __future__ import annotations

import functools
import secrets
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .privacy import ACCOUNTANTS, DELTA, check_privacy, is_number
from .quiet import quiet_opacus
from .runtime import release_memory
from .training import check_data, evaluate


class TanhCNN(nn.Module):
    """The tempered-sigmoid CNN of Papernot et al. (2021), 26k weights, for DP-SGD on MNIST.

    conv 16@8x8 stride 2 -> tanh -> maxpool 2 (stride 1) -> conv 32@4x4 stride 2 -> tanh -> maxpool 2
    (stride 1) -> fc 32 -> tanh -> fc 10. tanh keeps activations bounded, which suits clipped, noisy
    gradients better than ReLU; there is no BatchNorm, so Opacus accepts it as it is.
    """

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 16, 8, stride=2, padding=2), nn.Tanh(), nn.MaxPool2d(2, 1),  # 16 x 12 x 12
            nn.Conv2d(16, 32, 4, stride=2), nn.Tanh(), nn.MaxPool2d(2, 1),            # 32 x 4 x 4
            nn.Flatten(), nn.Linear(32 * 4 * 4, 32), nn.Tanh(), nn.Linear(32, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


PHYSICAL_BATCH = 256  # DP-SGD computes a batch in slices of at most this many samples (memory, not math)
# Ghost clipping stores no per-sample gradient, only each sample's activations and output gradients. For a
# linear head on 3,969 features, slices of 512 keep a step's peak about 90 MB lower than slices of 2,048
# (measured), at little cost in speed.
PHYSICAL_BATCH_FEATURES = 512


def is_features(inputs) -> bool:
    """Whether ``inputs`` are 2-D feature tensors (N, D), float or compact int8, rather than digits."""
    return isinstance(inputs, torch.Tensor) and inputs.ndim == 2


def check_inputs(inputs, labels) -> None:
    """``ValueError`` unless ``inputs`` are digits (:func:`~secure_ai.training.check_data`) or 2-D features
    (float, or int8 as :func:`secure_ai.features.scatter_features` stores them) that fit ``labels``."""
    if not is_features(inputs):
        check_data(inputs, labels)
        return
    if inputs.dtype != torch.int8 and not inputs.is_floating_point():
        raise ValueError(f"features must be floats or compact int8, got {inputs.dtype}")
    if len(inputs) == 0:
        raise ValueError("no samples: the dataset is empty")
    if not isinstance(labels, torch.Tensor) or labels.shape != (len(inputs),):
        raise ValueError(f"labels must have shape ({len(inputs)},) to match the features, got "
                         f"{tuple(getattr(labels, 'shape', ()))}")
    if inputs.is_floating_point() and not torch.isfinite(inputs).all():
        raise ValueError("features must be finite")


@torch.no_grad()
def accuracy(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, batch_size: int = 2000) -> float:
    """Fraction of ``inputs`` (digits or 2-D features) that ``model`` classifies as ``labels``."""
    check_inputs(inputs, labels)
    if not is_features(inputs):
        return evaluate(model, inputs, labels)[0]
    model.eval()
    correct = sum((model(inputs[i:i + batch_size]).argmax(1) == labels[i:i + batch_size]).sum().item()
                  for i in range(0, len(labels), batch_size))
    return correct / len(labels)


class IncompatibleModelError(ValueError):
    """The model has layers DP-SGD cannot train (e.g. BatchNorm mixes the samples of a batch)."""


def check_compatible(model: nn.Module) -> None:
    """Raise :class:`IncompatibleModelError` naming the remedy when Opacus cannot train ``model``."""
    from opacus.validators import ModuleValidator

    with quiet_opacus():
        problems = ModuleValidator.validate(model, strict=False)
    if problems:
        listed = "\n".join(f"  - {problem}" for problem in problems)
        raise IncompatibleModelError(
            f"{type(model).__name__} cannot be trained with DP-SGD:\n{listed}\n"
            "Fix: model = ModuleValidator.fix(model)  (from opacus.validators import ModuleValidator), "
            "which swaps BatchNorm for GroupNorm; then create the optimizer for the fixed model."
        )



def os_generator() -> torch.Generator:
    """A fresh torch CPU generator seeded with 64 bits from the operating system's secure source.

    The data scientist can neither choose nor predict its seed, so it cannot replay the noise and subtract it.
    The generator itself is torch's Mersenne Twister: unpredictable without the seed, not a cryptographic
    generator; and Gaussian noise in floating point is not hardened against the attacks of Mironov (2012)
    and Jin et al. (S&P 2022). Opacus's ``secure_mode`` addresses both and needs ``torchcsprng``, which
    torch 2 does not support.
    """
    return torch.Generator().manual_seed(secrets.randbits(64))


@functools.cache
def _finite_dp_optimizer() -> type:
    """Opacus's DPOptimizer, except that a sample with a non-finite per-sample gradient contributes zero."""
    from opacus.optimizers import DPOptimizer

    class FiniteDPOptimizer(DPOptimizer):
        def clip_and_accumulate(self):
            grads = self.grad_samples
            if len(grads[0]):
                # A sample is zeroed when the sum of its gradient, per parameter, is not finite: any NaN or
                # inf in it makes that sum NaN or inf (so does an overflowing sum, whose norm overflows too).
                # A rule on the sample's own gradient alone, as clipping is; the sums cost an order of
                # magnitude less than isfinite() on every element (about 2 ms a step, TanhCNN, 256 samples).
                finite = torch.ones(len(grads[0]), dtype=torch.bool)
                for g in grads:
                    finite &= g.reshape(len(g), -1).sum(dim=1).isfinite()
                if not finite.all():  # 0 * inf is NaN: zero the sample before Opacus clips and sums
                    for p, g in zip(self.params, grads):
                        p.grad_sample = g.masked_fill(~finite.view(-1, *[1] * (g.ndim - 1)), 0.0)
            # finite from here on; a sample whose norm overflows gets clip factor C / inf = 0: it adds zero
            super().clip_and_accumulate()

    return FiniteDPOptimizer


@dataclass
class PrivateTraining:
    """Everything a DP-SGD loop needs, made by :func:`make_private`.

    ``model`` is Opacus's wrapper (it computes one gradient per sample); ``module`` is your own model
    inside it. ``steps`` counts the optimizer steps actually taken, which is what epsilon depends on.
    A record whose per-sample gradient is not finite adds zero to the clipped sum: the weights stay finite
    whatever the data, as long as they do not start within one update of float32's largest value.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    loader: torch.utils.data.DataLoader
    engine: object
    delta: float
    accountant: str
    criterion: nn.Module
    steps: int = 0
    ghost: bool = False  # ghost clipping (2-D features): Opacus clips in a second backward pass

    @property
    def module(self) -> nn.Module:
        return self.model._module

    @property
    def noise_multiplier(self) -> float:
        return float(self.optimizer.noise_multiplier)

    @property
    def max_grad_norm(self) -> float:
        return float(self.optimizer.max_grad_norm)

    @property
    def sample_rate(self) -> float:
        return float(self.loader.sample_rate)

    @property
    def steps_per_epoch(self) -> int:
        return len(self.loader)

    def epsilon(self) -> float:
        """Epsilon spent so far, from the privacy engine's own accountant."""
        with quiet_opacus():
            return float(self.engine.get_epsilon(self.delta)) if self.steps else 0.0

    def train_epoch(self, progress: bool = True, desc: str = "DP-SGD", on_step=None) -> float:
        """One pass of Poisson-sampled batches (clip each sample's gradient, add noise, step).

        Batches larger than :data:`PHYSICAL_BATCH` (:data:`PHYSICAL_BATCH_FEATURES` for features) are
        computed in slices of that size (Opacus's ``BatchMemoryManager``): every slice clips its samples'
        gradients and adds them to a running sum; only the last slice of a batch adds the noise and steps.
        The same step and the same privacy, in a fraction of the memory.
        Returns the mean training loss; ``on_step(i)`` is called after the i-th step (1-based) of the epoch.
        """
        from opacus.utils.batch_memory_manager import BatchMemoryManager

        from .data import normalize

        self.model.train()
        total, count, step = 0.0, 0, 0
        manager = BatchMemoryManager(data_loader=self.loader, optimizer=self.optimizer,
                                     max_physical_batch_size=PHYSICAL_BATCH_FEATURES if self.ghost
                                     else PHYSICAL_BATCH)
        with quiet_opacus(), manager as slices:
            # mininterval: a few updates a second at most, so that a long run does not flood Jupyter
            bar = tqdm(slices, desc=desc, disable=not progress, leave=False, mininterval=1.0)
            for i, (x, y) in enumerate(bar, 1):
                if x.dtype == torch.uint8:  # raw digits stay compact in memory: normalized slice by slice
                    x = normalize(x)
                self.optimizer.zero_grad(set_to_none=True)
                if len(y) == 0 and not self.ghost:  # an empty Poisson batch is still a step: noise only,
                    for p in self.module.parameters():  # and it is accounted (ghost mode handles it itself)
                        p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype)
                    self.optimizer.step()
                else:
                    loss = self.criterion(self.model(x), y)
                    loss.backward()
                    self.optimizer.step()  # a real step only after the last slice of a batch
                    total += loss.item() * len(y) if len(y) else 0.0
                count += len(y)
                if i % 10 == 0:
                    release_memory()  # batch sizes vary every step: without this, memory keeps growing
                if not self.optimizer._is_last_step_skipped:
                    self.steps += 1
                    step += 1
                    if on_step is not None:
                        on_step(step)
        # Opacus keeps the last slice's per-sample gradients on the parameters until the next zero_grad
        # (batch x weights floats: 41 MB for Part 6's MLP): drop them, or every trained model carries them
        self.optimizer.zero_grad(set_to_none=True)
        release_memory()
        return total / max(count, 1)

    def fit(self, test: tuple[torch.Tensor, torch.Tensor], epochs: int, evals_per_epoch: int = 1,
            progress: bool = True) -> list[dict]:
        """Train ``epochs`` DP epochs, evaluating on ``test`` (digits or features, as trained on)
        ``evals_per_epoch`` times per epoch.

        Returns one ``{"epoch", "steps", "epsilon", "accuracy"}`` per evaluation (``epoch`` may be 0.5).
        """
        if not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
        if not isinstance(evals_per_epoch, int) or not 1 <= evals_per_epoch <= self.steps_per_epoch:
            raise ValueError(
                f"evals_per_epoch must be in [1, {self.steps_per_epoch}], got {evals_per_epoch!r}")
        per_epoch = self.steps_per_epoch
        checkpoints = {round(per_epoch * k / evals_per_epoch): k for k in range(1, evals_per_epoch + 1)}
        history = []
        bar = tqdm(range(epochs), desc=f"DP-SGD (sigma={self.noise_multiplier:.2f})", disable=not progress)

        def record(epoch: int, step: int) -> None:
            if step in checkpoints:
                correct = accuracy(self.module, *test)
                self.model.train()
                history.append({"epoch": epoch + checkpoints[step] / evals_per_epoch, "steps": self.steps,
                                "epsilon": self.epsilon(), "accuracy": correct})
                bar.set_postfix(test_acc=f"{correct:.4f}", epsilon=f"{history[-1]['epsilon']:.2f}")

        for epoch in bar:
            self.train_epoch(progress=progress, on_step=functools.partial(record, epoch))
        return history


def make_private(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    *,
    batch_size: int,
    max_grad_norm: float,
    noise_multiplier: float | None = None,
    target_epsilon: float | None = None,
    epochs: int | None = None,
    delta: float = DELTA,
    accountant: str = "prv",
    sample_rate: float | None = None,
    generator: torch.Generator | None = None,
) -> PrivateTraining:
    """Make ``model`` + ``optimizer`` train with DP-SGD on ``(inputs, labels)``, via Opacus.

    ``inputs`` are digits (normalized (N, 1, 28, 28), or raw uint8 (N, 28, 28), which stay raw: a quarter
    of the memory, each slice normalized as it is used), or 2-D features (N, D), float or the compact int8
    of :func:`secure_ai.features.scatter_features`.

    Give either ``noise_multiplier`` (then epsilon grows as you train), or ``target_epsilon`` and
    ``epochs`` (Opacus picks the smallest noise that stays within epsilon after that many epochs).
    Batches are Poisson-sampled with rate ``batch_size / len(inputs)``, as the accountant assumes.
    With ``sample_rate`` (and ``noise_multiplier``), the rate, the steps per epoch (``int(1 / rate)``)
    and the divisor of each noisy gradient sum (``batch_size``) are fixed by the caller and do not
    depend on ``len(inputs)``: what federated DP-SGD needs so that nothing released depends on the exact n.

    Per-sample gradients: on digits, expanded weights (``grad_sample_mode="ew"``), and a record whose
    gradient is not finite adds zero (the weights may come from a data scientist: DP review 3.9). On
    features, Opacus's ghost clipping (Li et al. 2022): each sample's gradient norm comes from its
    activations and output gradients, and a second backward pass sums the clipped gradients, so no
    per-sample gradient is stored (about 25 times faster for a linear head on 3,969 features). The same
    clipping and noise; but Opacus's own clipping, without the non-finite safeguard: train features on
    weights you chose (a curator's model), not on weights someone else sends.

    ``generator`` draws the Poisson sampling and the noise. Leave it ``None`` for a fresh
    :func:`os_generator`, always, on an owner's data: only a reproducible experiment on data that is not
    private passes a seeded one. torch's global generator is never used.
    """
    inputs, labels = torch.as_tensor(inputs), torch.as_tensor(labels)
    check_inputs(inputs, labels)
    ghost = is_features(inputs)
    if (noise_multiplier is None) == (target_epsilon is None):
        raise ValueError("give exactly one of noise_multiplier or target_epsilon (with epochs)")
    if target_epsilon is not None:
        check_privacy(target_epsilon, delta)
        if not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"target_epsilon needs epochs, a positive integer; got {epochs!r}")
    elif not noise_multiplier > 0:
        raise ValueError(f"noise_multiplier must be positive, got {noise_multiplier!r}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be between 0 and 1 (exclusive), got {delta!r}")
    if sample_rate is not None:
        if target_epsilon is not None or not (is_number(sample_rate) and 0 < sample_rate <= 1):
            raise ValueError(f"sample_rate must be in (0, 1], with noise_multiplier; got {sample_rate!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size (the expected batch) must be a positive int, got {batch_size!r}")
    elif not isinstance(batch_size, int) or not 1 <= batch_size <= len(inputs):
        raise ValueError(f"batch_size must be an integer in [1, {len(inputs)}], got {batch_size!r}")
    if not max_grad_norm > 0:
        raise ValueError(f"max_grad_norm must be positive, got {max_grad_norm!r}")
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    check_compatible(model)
    generator = os_generator() if generator is None else generator

    from opacus import PrivacyEngine
    from opacus.data_loader import DPDataLoader
    from torch.utils.data import DataLoader, TensorDataset

    dataset = TensorDataset(inputs, labels)
    # Opacus's Poisson loader samples with the generator of the loader it replaces
    loader = DataLoader(dataset, batch_size=batch_size, generator=generator) if sample_rate is None else \
        DPDataLoader(dataset, sample_rate=sample_rate, generator=generator)  # Poisson, at the caller's rate
    criterion = nn.CrossEntropyLoss()
    with quiet_opacus():
        engine = PrivacyEngine(accountant=accountant)
        # "ew" (expanded weights): per-sample gradients from one batched backward pass, about 25% faster
        # on a CPU than Opacus's default hooks for the same clipping and noise (measured on TanhCNN)
        common = dict(module=model, optimizer=optimizer, data_loader=loader, max_grad_norm=max_grad_norm,
                      grad_sample_mode="ghost" if ghost else "ew", noise_generator=generator,
                      poisson_sampling=sample_rate is None)
        if ghost:  # Opacus wraps the loss too: its backward() is the two passes of ghost clipping
            common["criterion"] = criterion
        if target_epsilon is not None:
            made = engine.make_private_with_epsilon(**common, target_epsilon=target_epsilon,
                                                    target_delta=delta, epochs=epochs)
        else:
            made = engine.make_private(**common, noise_multiplier=noise_multiplier)
    if ghost:
        wrapped, dp_optimizer, criterion, dp_loader = made
    else:
        wrapped, dp_optimizer, dp_loader = made
        finite = _finite_dp_optimizer()
        if type(dp_optimizer) is not finite.__base__:  # what Opacus makes for flat clipping on one machine
            raise RuntimeError(f"unexpected Opacus optimizer {type(dp_optimizer).__name__}")
        dp_optimizer.__class__ = finite  # the same object and state, robust to non-finite gradients
    if sample_rate is not None:  # Opacus derives both from len(inputs): fix them to the caller's values
        dp_optimizer.expected_batch_size = batch_size
        dp_optimizer.attach_step_hook(engine.accountant.get_optimizer_hook_fn(sample_rate=sample_rate))
    return PrivateTraining(wrapped, dp_optimizer, dp_loader, engine, delta, accountant, criterion,
                           ghost=ghost)
