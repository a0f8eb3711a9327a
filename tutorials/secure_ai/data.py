"""MNIST on disk, as tensors in memory, split among data owners, and the checks of digit tensors.

The data root comes from the environment variable ``SECURE_AI_DATA`` (default: ``data/`` at the
repository root). torchvision looks for ``<root>/MNIST/raw/`` and downloads there when files are missing.
"""
from __future__ import annotations

import gzip
import os
import weakref
from pathlib import Path

import numpy as np
import torch

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
REPO_ROOT = Path(__file__).resolve().parents[2]


class MNISTNotFoundError(FileNotFoundError):
    """MNIST is not on disk and could not be downloaded."""

    def __init__(self, root: Path):
        self.folder = Path(root) / "MNIST" / "raw"
        files = "\n".join(f"  {self.folder / name}" for name in MNIST_FILES)
        super().__init__(
            f"MNIST was not found in {self.folder} and could not be downloaded.\n"
            f"Put the four original files (uncompressed, or with .gz) here:\n{files}\n"
            "or point SECURE_AI_DATA at a folder that has MNIST/raw/ inside."
        )


def data_root() -> Path:
    """The folder that holds ``MNIST/raw``: ``$SECURE_AI_DATA`` or ``<repo>/data``."""
    return Path(os.environ.get("SECURE_AI_DATA") or REPO_ROOT / "data").expanduser().resolve()


def load_mnist(train: bool = True, root: str | Path | None = None, download: bool = True):
    """The torchvision MNIST dataset (images normalized to mean 0, std 1)."""
    from torchvision import datasets, transforms

    root = Path(root) if root is not None else data_root()
    normalize = transforms.Compose(
        [transforms.ToTensor(), transforms.Normalize((MNIST_MEAN,), (MNIST_STD,))]
    )
    try:
        return datasets.MNIST(root, train=train, download=download, transform=normalize)
    except (RuntimeError, OSError) as error:  # torchvision: "Dataset not found" / URLError / HTTPError
        raise MNISTNotFoundError(root) from error


def normalize(images) -> torch.Tensor:
    """Raw uint8 digits of shape (N, 28, 28) -> float32 (N, 1, 28, 28) with MNIST's mean and std.

    Takes a tensor or a NumPy array, read-only ones included (the cache's, or what syft hands over),
    without a uint8 copy: the float32 result is the only new memory.
    """
    if isinstance(images, np.ndarray):
        dtype, shape = images.dtype, images.shape
        if dtype == np.uint8 and images.ndim == 3 and tuple(shape[1:]) == (28, 28):
            floats = torch.from_numpy(images.astype(np.float32)).unsqueeze_(1)
            return floats.div_(255.0).sub_(MNIST_MEAN).div_(MNIST_STD)
    else:
        images = torch.as_tensor(images)
        dtype, shape = images.dtype, tuple(images.shape)
        if dtype == torch.uint8 and images.ndim == 3 and tuple(shape[1:]) == (28, 28):
            return images.unsqueeze(1).float().div_(255.0).sub_(MNIST_MEAN).div_(MNIST_STD)
    raise ValueError(f"expected uint8 images of shape (N, 28, 28), got {dtype} {tuple(shape)}")


def check_images(images: torch.Tensor, what: str = "images") -> None:
    """``ValueError`` unless ``images`` is a non-empty tensor of normalized digits, shape (N, 1, 28, 28)."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or tuple(images.shape[1:]) != (1, 28, 28):
        shape = tuple(images.shape) if hasattr(images, "shape") else type(images).__name__
        raise ValueError(f"{what} must be a float tensor of shape (N, 1, 28, 28), got {shape}")
    if len(images) == 0:
        raise ValueError(f"{what} is empty: an attack needs at least one image")


def read_idx(path: str | Path) -> np.ndarray:
    """One IDX file (MNIST's format, optionally ``.gz``) as a NumPy array, read directly from disk."""
    path = Path(path)
    with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as file:
        raw = file.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path} is truncated: header says {shape}, found {data.size} values")
    return data.reshape(shape)


def _find_raw(root: Path, name: str) -> Path | None:
    folder = root / "MNIST" / "raw"
    return next((p for p in (folder / name, folder / f"{name}.gz") if p.is_file()), None)


# (train, root) -> weak references to (images, labels): calls share one copy while anyone holds it, and the
# cache keeps nothing alive by itself
_raw: dict[tuple[bool, str], tuple[weakref.ref, weakref.ref]] = {}
_tensors: dict[tuple[bool, str], tuple[weakref.ref, weakref.ref]] = {}


def _key(train: bool, root: str | Path | None) -> tuple[bool, str]:
    return bool(train), str(Path(root).resolve() if root is not None else data_root())


def _shared(cache: dict, key: tuple[bool, str], load):
    """The pair cached under ``key`` while anyone still holds it, else ``load()``'s (then cached weakly)."""
    pair = tuple(ref() for ref in cache.get(key, ()))
    if len(pair) == 2 and all(item is not None for item in pair):
        return pair
    pair = load()
    cache[key] = tuple(weakref.ref(item) for item in pair)
    return pair


def _read_raw(train: bool, root: str) -> tuple[np.ndarray, np.ndarray]:
    prefix = "train" if train else "t10k"
    paths = [_find_raw(Path(root), f"{prefix}-{kind}") for kind in ("images-idx3-ubyte", "labels-idx1-ubyte")]
    if all(paths):  # fast path: no torchvision import (~165 MB less memory in every notebook)
        images, labels = read_idx(paths[0]), read_idx(paths[1]).astype(np.int64)
    else:  # torchvision downloads what is missing, or we say which files to put where
        dataset = load_mnist(train=train, root=root)
        images, labels = dataset.data.numpy(), dataset.targets.numpy()
    images.flags.writeable = labels.flags.writeable = False  # shared: nobody may change it
    return images, labels


def mnist_raw(train: bool = True, root: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """MNIST as stored: uint8 images (N, 28, 28) and int64 labels (N,), read-only NumPy arrays.

    This compact form (47 MB for the training set) is what data owners keep on their datasites. Calls
    share one copy while anyone holds it; after that the files are read again (0.05 s), so that a notebook
    that keeps only its own copy does not pay twice.
    """
    key = _key(train, root)
    return _shared(_raw, key, lambda: _read_raw(*key))


def mnist_tensors(train: bool = True, root: str | Path | None = None):
    """All of MNIST train (60,000) or test (10,000) as ``(images, labels)`` tensors.

    ``images`` is float32 of shape (N, 1, 28, 28), normalized; ``labels`` is int64 of shape (N,).
    Training from memory is many times faster than a DataLoader. Calls share one copy while anyone holds
    it; the cache does not keep the 188 MB of float training images alive by itself.
    """
    key = _key(train, root)

    def load():
        images, labels = mnist_raw(*key)
        return normalize(images), torch.from_numpy(labels.copy())

    return _shared(_tensors, key, load)


def mock_like(images, labels, n: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Fake data with the format of the real thing: ``n`` uniform-noise images and random labels.

    A mock lets a data scientist write and test code without seeing a single real sample.
    """
    images, labels = np.asarray(images), np.asarray(labels)
    if n < 1:
        raise ValueError(f"a mock needs at least one sample, got n={n}")
    rng = np.random.default_rng(seed)
    if images.dtype == np.uint8:
        fake = rng.integers(0, 256, size=(n, *images.shape[1:]), dtype=np.uint8)
    else:
        fake = rng.standard_normal((n, *images.shape[1:])).astype(images.dtype)
    return fake, rng.integers(0, 10, size=n).astype(labels.dtype)


def _check_owners(n_samples: int, n_owners: int) -> None:
    if not isinstance(n_owners, (int, np.integer)) or n_owners < 1:
        raise ValueError(f"n_owners must be a positive integer, got {n_owners!r}")
    if n_samples < n_owners:
        raise ValueError(f"cannot split {n_samples} samples among {n_owners} owners: some would get none")


def _as_labels(labels) -> np.ndarray:
    labels = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be one-dimensional, got shape {labels.shape}")
    return labels


def partition_iid(n_samples: int, n_owners: int, seed: int = 0) -> list[np.ndarray]:
    """Shuffle ``range(n_samples)`` and deal it into ``n_owners`` parts of (almost) equal size."""
    _check_owners(n_samples, n_owners)
    order = np.random.default_rng(seed).permutation(n_samples)
    return [np.sort(part) for part in np.array_split(order, n_owners)]


def partition_by_label(labels, n_owners: int, shards_per_owner: int = 2, seed: int = 0) -> list[np.ndarray]:
    """Pathological non-IID split of McMahan et al. (2017).

    Sort the samples by label, cut them into ``n_owners * shards_per_owner`` equal shards and give each
    owner ``shards_per_owner`` random shards, so that each owner sees only a few digits.
    """
    labels = _as_labels(labels)
    _check_owners(len(labels), n_owners)
    if shards_per_owner < 1:
        raise ValueError(f"shards_per_owner must be at least 1, got {shards_per_owner}")
    n_shards = n_owners * shards_per_owner
    if n_shards > len(labels):
        raise ValueError(f"{n_shards} shards requested but there are only {len(labels)} samples")
    rng = np.random.default_rng(seed)
    by_label = np.argsort(labels, kind="stable")
    shards = np.array_split(by_label, n_shards)
    shard_order = rng.permutation(n_shards)
    return [
        np.sort(np.concatenate([shards[s] for s in shard_order[i::n_owners]])) for i in range(n_owners)
    ]


def partition_dirichlet(
    labels, n_owners: int, alpha: float = 0.5, seed: int = 0, max_tries: int = 100
) -> list[np.ndarray]:
    """Non-IID split where each digit is divided among owners in Dirichlet(``alpha``) proportions.

    Small ``alpha`` (0.1) gives very skewed owners; large ``alpha`` (100) is close to IID.
    Draws again (up to ``max_tries`` times) until every owner has at least one sample.
    """
    labels = _as_labels(labels)
    _check_owners(len(labels), n_owners)
    if not alpha > 0:
        raise ValueError(f"alpha must be positive, got {alpha}")
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(n_owners)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            cuts = (np.cumsum(rng.dirichlet([alpha] * n_owners))[:-1] * len(idx)).astype(int)
            for owner, chunk in enumerate(np.split(idx, cuts)):
                parts[owner].append(chunk)
        result = [np.sort(np.concatenate(p)) for p in parts]
        if all(len(p) > 0 for p in result):
            return result
    raise ValueError(
        f"Dirichlet(alpha={alpha}) left an owner with no samples in {max_tries} draws; "
        "use a larger alpha or fewer owners"
    )
