"""Shared fixtures: real MNIST when it is on disk, a non-interactive matplotlib backend."""
import os

import matplotlib
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
