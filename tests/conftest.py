"""Shared fixtures: real MNIST when it is on disk, in-memory data owners, matplotlib without a display."""
import os

import matplotlib
import numpy as np
import pytest

matplotlib.use("Agg")


@pytest.fixture(scope="session")
def mnist():
    """``((train_x, train_y), (test_x, test_y))``; skips only where no MNIST is on disk (CI has it)."""
    from secure_ai.data import MNISTNotFoundError, mnist_tensors

    try:
        return mnist_tensors(True), mnist_tensors(False)
    except MNISTNotFoundError as error:  # pragma: no cover - CI sets SECURE_AI_DATA
        if os.environ.get("CI"):
            raise  # in CI a missing dataset is a failure, never a skip
        pytest.skip(str(error))


@pytest.fixture(scope="module")
def start_owner():
    """Starts in-memory data owners for one test module, and shuts them down after it.

    ``start_owner(name, private=..., mock=..., pointer_ops=False, email=..., password=...)`` starts a
    DataOwner that holds the dataset ``numbers`` (one asset ``x``: ``private``, default ``arange(6.0)``,
    and ``mock``, default zeros) and a data scientist's account; returns ``(owner, the data scientist's
    client)``.
    """
    started = []

    def start(name, private=None, mock=None, pointer_ops=False, email="ds@example.org", password="s3cret"):
        from secure_ai.datasites import DataOwner
        from secure_ai.pointers import enable_pointer_ops

        owner = DataOwner(name)
        started.append(owner)
        private = np.arange(6.0) if private is None else private
        owner.upload_dataset("numbers", private={"x": private},
                             mock={"x": np.zeros_like(private) if mock is None else mock})
        if pointer_ops:
            enable_pointer_ops(owner)
        owner.add_data_scientist(email, password)
        return owner, owner.login(email, password)

    yield start
    for owner in started:
        owner.shutdown()
