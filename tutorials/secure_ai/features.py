"""Handcrafted image features for DP learning: the ScatterNet of Tramèr & Boneh (2021), through kymatio.

Under DP, features matter more than architecture (Tramèr & Boneh 2021): a linear model trained with DP-SGD
on fixed ScatterNet features beats end-to-end CNNs on MNIST at the same epsilon. The transform is a fixed
bank of Morlet wavelets (J = 2 scales, L = 8 angles: 81 channels of 7 x 7), with nothing learned from
data, and each image's features are normalized by that image's own statistics. So the features of one
image depend on that image alone: computing them costs no privacy, and DP-SGD on them is accounted
exactly as DP-SGD on pixels.

* :func:`scatter_features` images -> per-image-normalized ScatterNet features (N, 3969), in chunks;
  ``compact=True`` stores them as int8 (a quarter of the memory of float32)
* DP normalization (Tramèr & Boneh's "BN" inputs): :func:`channel_moments` of each image, released by
  :func:`dp_channel_statistics` with the Gaussian mechanism (:func:`normalization_runs` is its cost, to
  compose with the training's), then ``scatter_features(..., statistics=...)`` standardizes each channel
* :class:`ScatterNet` the same transform as a frozen ``nn.Module``: ``nn.Sequential(ScatterNet(), head)``
  classifies images with a ``head`` trained on features (what a membership attack needs)
* :func:`linear_head` the classifier of Tramèr & Boneh: one linear layer on the features
* DP-SGD on features is :func:`secure_ai.dp_sgd.make_private` given the 2-D feature tensor (Opacus's ghost
  clipping); :func:`accuracy` (that of :mod:`~secure_ai.dp_sgd`) measures a head on features
"""
from __future__ import annotations

import hashlib

import torch
from torch import nn

from .data import MNIST_MEAN, MNIST_STD
from .dp_sgd import accuracy  # noqa: F401  (re-exported: the accuracy of a head on features)
from .runtime import release_memory

J, ANGLES, SIZE = 2, 8, 28                 # 2 scales, 8 angles, 28 x 28 digits
CHANNELS = 1 + J * ANGLES + ANGLES ** 2 * J * (J - 1) // 2  # order 0, 1 and 2 paths: 81
SIDE = SIZE // 2 ** J                      # each channel is subsampled to 7 x 7
N_FEATURES = CHANNELS * SIDE * SIDE        # 3,969 numbers per digit
GROUPS = 27                                # normalize each image over groups of 3 channels (Tramèr & Boneh)
COMPACT_SCALE = 1 / 16                     # int8 storage: steps of 1/16, range +-8 (normalized units)
CHUNK = 500                                # images transformed at once (memory, not results)
FORWARD_CHUNK = 100                        # the same, in ScatterNet's forward (models evaluated on digits)


def _pixels(images) -> torch.Tensor:
    """Digits as float32 (N, 28, 28) in [0, 1], from raw uint8 or from MNIST-normalized floats.

    A fixed map that looks at no other image: uint8 / 255, or undoing the series' normalization.
    """
    images = torch.as_tensor(images)
    if images.ndim == 4 and images.shape[1] == 1:
        images = images[:, 0]
    if images.ndim != 3 or tuple(images.shape[1:]) != (SIZE, SIZE):
        raise ValueError(f"images must be digits of shape (N, 28, 28) or (N, 1, 28, 28), got "
                         f"{tuple(images.shape)}")
    if images.dtype == torch.uint8:
        return images.float() / 255
    if not images.is_floating_point():
        raise ValueError(f"images must be raw uint8 or MNIST-normalized floats, got {images.dtype}")
    return images.float() * MNIST_STD + MNIST_MEAN


def _normalize_each(features: torch.Tensor) -> torch.Tensor:
    """Group normalization of each image on its own (zero mean, unit variance within each group of channels):
    GroupNorm without learned scale, computed once instead of at every step."""
    grouped = features.reshape(len(features), GROUPS, -1)
    variance, mean = torch.var_mean(grouped, dim=-1, unbiased=False, keepdim=True)
    return ((grouped - mean) / torch.sqrt(variance + 1e-5)).reshape(len(features), -1)


def _check_statistics(statistics):
    if statistics is None:
        return None
    mean, variance = (torch.as_tensor(t, dtype=torch.float32) for t in statistics)
    if mean.shape != (CHANNELS,) or variance.shape != (CHANNELS,) or not (
            torch.isfinite(mean).all() and torch.isfinite(variance).all() and (variance >= 0).all()):
        raise ValueError(f"statistics must be (mean, variance): {CHANNELS} finite numbers each, "
                         "variances >= 0")
    return mean, variance


class ScatterNet(nn.Module):
    """Images -> normalized ScatterNet features (N, 3969): a fixed transform, no trainable weights.

    Takes raw uint8 digits (N, 28, 28) or MNIST-normalized floats (N, 1, 28, 28); each image is transformed
    on its own, then normalized on its own (GroupNorm), or, given ``statistics`` = (mean, variance) of the
    81 channels, standardized with those (:func:`dp_channel_statistics` releases them under DP; a channel
    of variance 0 becomes 0). With ``compact``, the output is rounded as :func:`scatter_features` stores it.
    With ``memo``, each image's features are kept (compact: 4 KB a digit), keyed by a hash of the image,
    and not computed again: a membership attack shows the same digits to dozens of models.
    """

    def __init__(self, compact: bool = False, memo: bool = False, statistics=None):
        super().__init__()
        from kymatio.torch import Scattering2D

        self.scattering = Scattering2D(J=J, shape=(SIZE, SIZE), L=ANGLES)
        self.compact, self.memo = compact, {} if memo else None
        self.statistics = _check_statistics(statistics)

    def _transform(self, pixels: torch.Tensor) -> torch.Tensor:
        raw = self.scattering(pixels).reshape(-1, CHANNELS, SIDE * SIDE)
        if self.statistics is None:
            features = _normalize_each(raw.reshape(-1, N_FEATURES))
        else:  # as Tramer & Boneh: (x - mean) / sqrt(var + 1e-5) per channel, 0 where the variance is 0
            mean, variance = (t.view(1, -1, 1) for t in self.statistics)
            features = ((raw - mean) / torch.sqrt(variance + 1e-5) * (variance > 0)).reshape(-1, N_FEATURES)
        return _round_compact(features) if self.compact else features

    def _chunked(self, images: torch.Tensor) -> torch.Tensor:
        # FORWARD_CHUNK images at a time, then the scratch memory handed back (_in_chunks): kymatio's
        # intermediates for 2,000 digits at once were about 0.4 GB, and glibc kept 0.14 GB of 500-digit chunks
        out = torch.empty((len(images), N_FEATURES), dtype=torch.int8 if self.compact else torch.float32)
        return _in_chunks(images, FORWARD_CHUNK, None, False, out, self._transform)

    @torch.no_grad()
    def forward(self, images) -> torch.Tensor:
        images = torch.as_tensor(images)
        pixels = _pixels(images)  # checks the shape and dtype; the memo's keys
        if self.memo is None:
            rows = self._chunked(images)
        else:
            keys = [hashlib.blake2b(row.numpy().tobytes(), digest_size=16).digest() for row in pixels]
            new = list(dict.fromkeys(k for k in keys if k not in self.memo))
            if new:
                index = {k: i for i, k in enumerate(keys)}
                for key, row in zip(new, self._chunked(images[[index[k] for k in new]])):
                    self.memo[key] = row.clone()
            rows = torch.stack([self.memo[k] for k in keys])
        return rows.float() * COMPACT_SCALE if self.compact else rows


def _round_compact(features: torch.Tensor) -> torch.Tensor:
    return torch.round(features / COMPACT_SCALE).clamp_(-128, 127).to(torch.int8)


def _in_chunks(images, chunk: int, threads: int | None, progress: bool, out: torch.Tensor, transform):
    """``out[i] = transform(pixels of images[i])``, ``chunk`` images at a time, with ``threads`` torch threads
    (restored afterwards). The scattering's scratch memory (about 150 MB for 60,000 digits) is then given
    back to the operating system, not kept by the allocator for the rest of a notebook."""
    from tqdm.auto import tqdm

    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive integer, got {chunk!r}")
    previous = torch.get_num_threads()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        for start in tqdm(range(0, len(images), chunk), desc="ScatterNet", disable=not progress,
                          mininterval=1.0):
            out[start:start + chunk] = transform(_pixels(images[start:start + chunk]))
    finally:
        torch.set_num_threads(previous)
        release_memory()
    return out


def scatter_features(images, compact: bool = False, chunk: int = CHUNK, threads: int | None = None,
                     progress: bool = False, statistics=None) -> torch.Tensor:
    """ScatterNet features of ``images``: float32 (N, 3969), or int8 with ``compact`` (divide by 16 to read).

    Computed ``chunk`` images at a time, so memory stays at the output plus one chunk. ``threads`` (torch
    threads for the transform, e.g. 2 on a 2-core laptop) is restored afterwards. Each row depends only on
    its own image (and on ``statistics``, when given: see :class:`ScatterNet`): the same digit gives the
    same row, whatever else is in ``images``.
    """
    images = torch.as_tensor(images)
    _pixels(images[:1])  # check the shape and dtype before any work
    net = ScatterNet(compact=compact, statistics=statistics)
    out = torch.empty((len(images), N_FEATURES), dtype=torch.int8 if compact else torch.float32)
    return _in_chunks(images, chunk, threads, progress, out, net._transform)


def channel_moments(images, chunk: int = CHUNK, threads: int | None = None,
                    progress: bool = False) -> torch.Tensor:
    """Each image's ScatterNet moments, before any normalization: (N, 2, 81), the mean over the 7 x 7
    positions of each channel, and the mean of its square. What :func:`dp_channel_statistics` releases."""
    images = torch.as_tensor(images)
    _pixels(images[:1])
    scattering = ScatterNet().scattering

    def moments(pixels):
        raw = scattering(pixels).reshape(-1, CHANNELS, SIDE * SIDE)
        return torch.stack([raw.mean(-1), raw.square().mean(-1)], dim=1)

    return _in_chunks(images, chunk, threads, progress, torch.empty(len(images), 2, CHANNELS), moments)


NORMALIZATION_RELEASES = 2  # the channel means and the channel mean squares: two Gaussian mechanisms


def normalization_runs(noise_multiplier: float) -> list[tuple[float, float, int]]:
    """What :func:`dp_channel_statistics` costs, as runs for :func:`secure_ai.privacy.epsilon_spent`: two
    Gaussian mechanisms on sums of clipped vectors (sensitivity = the clip, add/remove), each one step at
    q = 1. Compose them with the training's runs: the total is what the data pays."""
    return [(float(noise_multiplier), 1.0, NORMALIZATION_RELEASES)]


def dp_channel_statistics(moments: torch.Tensor, *, noise_multiplier: float, clip_mean: float,
                          clip_square: float, generator: torch.Generator | None = None):
    """The 81 channels' mean and variance over a dataset, released with the Gaussian mechanism (Tramèr &
    Boneh 2021's DP normalization, without their uncharged median): ``(mean, variance)``.

    ``moments`` are :func:`channel_moments`. Each image's vector of 81 channel means is clipped to L2 norm
    ``clip_mean`` and summed, and noise N(0, (noise_multiplier * clip_mean)^2) is added to each coordinate;
    the same for the mean squares with ``clip_square``. Both sums are divided by N, the dataset's size,
    taken as public (as DP-SGD's sample rate q = B / N already does). The clips are constants chosen in
    advance, not computed from the data. The variance is mean square - mean^2, at least 0. Costs
    :func:`normalization_runs`. The noise comes from ``generator`` (default: one the OS seeds).
    """
    from .dp_sgd import os_generator

    moments = torch.as_tensor(moments, dtype=torch.float64)
    if moments.ndim != 3 or moments.shape[1:] != (2, CHANNELS) or len(moments) == 0:
        raise ValueError(f"moments must be channel_moments(images), shape (N, 2, {CHANNELS}); got "
                         f"{tuple(moments.shape)}")
    if not (noise_multiplier > 0 and clip_mean > 0 and clip_square > 0):
        raise ValueError("noise_multiplier, clip_mean and clip_square must be positive")
    generator = os_generator() if generator is None else generator
    released = []
    for vectors, clip in ((moments[:, 0], clip_mean), (moments[:, 1], clip_square)):
        factor = (clip / vectors.norm(dim=1).clamp(min=1e-12)).clamp(max=1.0)
        noise = torch.randn(CHANNELS, generator=generator, dtype=torch.float64) * noise_multiplier * clip
        released.append(((vectors * factor[:, None]).sum(0) + noise) / len(vectors))
    mean, square = released
    return mean.float(), (square - mean ** 2).clamp(min=0).float()


class _Head(nn.Module):
    """A linear layer on features, reading int8 features as stored (times :data:`COMPACT_SCALE`)."""

    def __init__(self, n_features: int = N_FEATURES, classes: int = 10):
        super().__init__()
        self.fc = nn.Linear(n_features, classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.dtype == torch.int8:
            features = features.float() * COMPACT_SCALE
        return self.fc(features)


def linear_head(n_features: int = N_FEATURES, classes: int = 10) -> nn.Module:
    """The ScatterNet + linear classifier of Tramèr & Boneh: one linear layer, initialized at zero.

    It reads float features or the int8 ones of ``scatter_features(..., compact=True)``. A zero start is
    the natural one for a linear model (every class equally likely), and costs no privacy.
    """
    head = _Head(n_features, classes)
    nn.init.zeros_(head.fc.weight)
    nn.init.zeros_(head.fc.bias)
    return head
