"""secure_ai.data: data root, MNIST loading and its error, partitions."""
import numpy as np
import pytest
import torch
from secure_ai import data


def test_data_root_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SECURE_AI_DATA", str(tmp_path))
    assert data.data_root() == tmp_path.resolve()
    monkeypatch.delenv("SECURE_AI_DATA")
    assert data.data_root() == (data.REPO_ROOT / "data").resolve()


def test_missing_mnist_names_the_files_and_folder(tmp_path):
    with pytest.raises(data.MNISTNotFoundError) as info:
        data.load_mnist(root=tmp_path, download=False)
    message = str(info.value)
    assert str(tmp_path / "MNIST" / "raw") in message
    for name in data.MNIST_FILES:
        assert name in message
    assert "SECURE_AI_DATA" in message
    assert isinstance(info.value, FileNotFoundError)


def test_real_mnist_tensors(mnist):
    (x, y), (xt, yt) = mnist
    assert x.shape == (60000, 1, 28, 28) and x.dtype == torch.float32
    assert xt.shape == (10000, 1, 28, 28) and yt.shape == (10000,)
    assert abs(x.mean().item()) < 0.01 and abs(x.std().item() - 1) < 0.01
    # label counts published with the dataset (shared/README.md)
    assert torch.bincount(y).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert torch.bincount(yt).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert data.mnist_tensors(True)[0] is x  # cached


def test_mnist_raw_is_compact_and_read_only(mnist):
    images, labels = data.mnist_raw(True)
    assert images.dtype == np.uint8 and images.shape == (60000, 28, 28)
    assert labels.shape == (60000,)
    with pytest.raises(ValueError):
        images[0, 0, 0] = 1
    assert torch.equal(data.normalize(images[:5].copy()), mnist[0][0][:5])
    assert torch.equal(data.normalize(images[:5]), mnist[0][0][:5])  # read-only: no copy needed
    assert torch.equal(data.normalize(torch.from_numpy(images[:5].copy())), mnist[0][0][:5])


def own_root(folder):
    """A data root of its own (links to the real files): the session's `mnist` fixture holds the usual one."""
    raw = folder / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in data.MNIST_FILES:
        source = next((data.data_root() / "MNIST" / "raw").glob(f"{name}*"))
        (raw / source.name).symlink_to(source)
    return folder


def test_mnist_tensors_are_shared_but_not_kept_alive_by_the_cache(mnist, tmp_path):
    """Memory: the 31 MB (test) or 188 MB (train) float copy lives only while a notebook holds it."""
    import gc
    import weakref

    tmp_path = own_root(tmp_path)
    images, labels = data.mnist_tensors(False, root=tmp_path)
    assert data.mnist_tensors(False, root=tmp_path)[0] is images  # shared while held
    assert torch.equal(images, mnist[1][0])
    dead = weakref.ref(images)
    del images, labels
    gc.collect()
    assert dead() is None, "the cache keeps the float copy alive"
    again, _ = data.mnist_tensors(False, root=tmp_path)
    assert again.shape == (10000, 1, 28, 28) and again.dtype == torch.float32


def test_mnist_raw_is_shared_but_not_kept_alive_by_the_cache(tmp_path):
    """Memory: a notebook that copies the raw digits into tensors does not also pay for the cache's 55 MB."""
    import gc
    import weakref

    tmp_path = own_root(tmp_path)
    images, labels = data.mnist_raw(False, root=tmp_path)
    assert data.mnist_raw(False, root=tmp_path)[0] is images      # shared while held
    dead = weakref.ref(images), weakref.ref(labels)
    first = images[:3].copy()
    del images, labels
    gc.collect()
    assert dead[0]() is None and dead[1]() is None, "the cache keeps the raw arrays alive"
    again, _ = data.mnist_raw(False, root=tmp_path)                  # read again, the same digits
    assert np.array_equal(again[:3], first) and not again.flags.writeable


def test_direct_idx_reading_matches_torchvision(mnist):
    images, labels = data.mnist_raw(False)
    dataset = data.load_mnist(train=False, download=False)
    assert np.array_equal(images, dataset.data.numpy()) and np.array_equal(labels, dataset.targets.numpy())
    assert labels.dtype == np.int64


def test_read_idx_handles_gzip_and_rejects_bad_files(tmp_path):
    import gzip

    body = bytes([0, 0, 8, 2, 0, 0, 0, 2, 0, 0, 0, 3, *range(6)])
    (tmp_path / "a-idx2-ubyte.gz").write_bytes(gzip.compress(body))
    assert data.read_idx(tmp_path / "a-idx2-ubyte.gz").tolist() == [[0, 1, 2], [3, 4, 5]]
    (tmp_path / "short").write_bytes(body[:-1])
    with pytest.raises(ValueError, match="truncated"):
        data.read_idx(tmp_path / "short")
    (tmp_path / "text").write_bytes(b"hello world")
    with pytest.raises(ValueError, match="not an IDX file"):
        data.read_idx(tmp_path / "text")


def test_normalize_rejects_wrong_input():
    with pytest.raises(ValueError, match="uint8"):
        data.normalize(np.zeros((2, 28, 28), dtype=np.float32))
    with pytest.raises(ValueError, match=r"\(N, 28, 28\)"):
        data.normalize(np.zeros((2, 1, 28, 28), dtype=np.uint8))


def test_mock_like_has_the_format_but_not_the_data():
    images = np.full((100, 28, 28), 7, dtype=np.uint8)
    labels = np.arange(100) % 10
    fake_x, fake_y = data.mock_like(images, labels, n=16, seed=1)
    assert fake_x.shape == (16, 28, 28) and fake_x.dtype == np.uint8
    assert fake_y.shape == (16,) and fake_y.dtype == labels.dtype
    assert not (fake_x == 7).all()
    assert np.array_equal(fake_x, data.mock_like(images, labels, n=16, seed=1)[0])
    floats, _ = data.mock_like(images.astype(np.float32), labels, n=4)
    assert floats.dtype == np.float32
    with pytest.raises(ValueError):
        data.mock_like(images, labels, n=0)


def _assert_exact_cover(parts, n):
    everything = np.concatenate(parts)
    assert len(everything) == n
    assert np.array_equal(np.sort(everything), np.arange(n))


def test_partition_iid_covers_every_index_once_and_is_seeded():
    parts = data.partition_iid(1001, 3, seed=5)
    _assert_exact_cover(parts, 1001)
    assert sorted(len(p) for p in parts) == [333, 334, 334]
    again = data.partition_iid(1001, 3, seed=5)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    other = data.partition_iid(1001, 3, seed=6)
    assert not np.array_equal(parts[0], other[0])


def test_partition_by_label_gives_few_digits_per_owner():
    labels = np.repeat(np.arange(10), 100)
    parts = data.partition_by_label(labels, n_owners=5, shards_per_owner=2, seed=0)
    _assert_exact_cover(parts, 1000)
    for part in parts:
        assert len(np.unique(labels[part])) <= 2


def test_partition_dirichlet_skew_depends_on_alpha():
    labels = np.repeat(np.arange(10), 300)
    skewed = data.partition_dirichlet(labels, 4, alpha=0.1, seed=0)
    even = data.partition_dirichlet(labels, 4, alpha=1000.0, seed=0)
    _assert_exact_cover(skewed, 3000)
    _assert_exact_cover(even, 3000)

    def spread(parts):  # mean over owners of the largest class share
        return np.mean([np.bincount(labels[p], minlength=10).max() / len(p) for p in parts])

    assert spread(skewed) > 0.3 > spread(even)
    assert all(len(p) > 0 for p in skewed)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: data.partition_iid(10, 0), "n_owners"),
        (lambda: data.partition_iid(2, 3), "some would get none"),
        (lambda: data.partition_by_label(np.zeros((3, 3)), 2), "one-dimensional"),
        (lambda: data.partition_by_label(np.arange(10), 2, shards_per_owner=0), "shards_per_owner"),
        (lambda: data.partition_by_label(np.arange(10), 3, shards_per_owner=4), "shards"),
        (lambda: data.partition_dirichlet(np.arange(10), 2, alpha=0), "alpha"),
        (lambda: data.partition_dirichlet(np.zeros(5, dtype=int), 5, alpha=0.01, max_tries=3), "no samples"),
    ],
)
def test_partitions_reject_bad_input(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_partitions_accept_torch_labels():
    parts = data.partition_by_label(torch.arange(20) % 10, 2, seed=0)
    _assert_exact_cover(parts, 20)
