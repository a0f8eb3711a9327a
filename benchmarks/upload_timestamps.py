"""What syft's timestamps tell a guest about an owner's number of records: a side channel we do not close.

syft 0.9.5 stamps every object it stores with the server's clock: the dataset (``created_at``) and each
asset's mock (``syft_created_at``). An upload stores the images (mock and private data), then the labels,
then the dataset, and each step takes longer the more private records it carries. A guest, who may list the
dataset and download its mocks, subtracts the stamps. ``syft_patches`` fix 8 stopped syft from reporting the
private arrays' size (which gave the count exactly); these gaps remain (issue 18, leak 2; Part 1, section 8).

For each n, an owner uploads n MNIST-sized digits (uint8, 28 x 28) behind the same 64-digit mock, as
``federated.upload_mnist`` does; a data scientist's account then reads the stamps. Prints, per n, the gaps
from the mocks' stamps to the dataset's, over ``--repeats`` fresh datasites, and the count a guest estimates
from one run's last gap, calibrated on the other runs (the same public software). About a minute:

    SECURE_AI_DATA=... .venv/bin/python benchmarks/upload_timestamps.py
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tutorials"))

from secure_ai import federated as fl  # noqa: E402
from secure_ai.datasites import DataOwner, shutdown_all  # noqa: E402
from secure_ai.quiet import quiet  # noqa: E402


def stamps_gaps(n: int, name: str) -> tuple[float, float]:
    """Seconds from the first and from the last mock's stamp to the dataset's stamp, as a guest reads them."""
    rng = np.random.default_rng()
    owner = DataOwner(name)
    try:
        fl.upload_mnist(owner, rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n))
        owner.add_data_scientist("guest@example.org", "guest-pw")
        guest = owner.login("guest@example.org", "guest-pw")
        with quiet():
            dataset = guest.datasets[fl.DATASET]
            mocks = [guest.api.services.action.get_mock(uid=asset.action_id) for asset in dataset.assets]
        stamps = sorted(mock.syft_created_at.utc_timestamp for mock in mocks)
        end = dataset.created_at.utc_timestamp
        return end - stamps[0], end - stamps[-1]
    finally:
        owner.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 3_000, 10_000, 20_000, 30_000])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    start = time.perf_counter()
    gaps = {n: [stamps_gaps(n, f"ts-{n}-{r}") for r in range(args.repeats)] for n in args.sizes}
    shutdown_all()
    print("Seconds from the first mock's stamp to the dataset's (from the last mock's), each run; then the")
    print("count a guest estimates from that run's last gap, calibrated on the other runs (its own")
    print("datasites, the same public software): the gap interpolated between the sizes' medians, in log-log")
    for n, runs in gaps.items():
        estimates = []
        for r, (_, last) in enumerate(runs):
            medians = [np.median([g[1] for k, g in enumerate(gaps[m]) if k != r]) for m in args.sizes]
            estimates.append(float(np.exp(np.interp(np.log(last), np.log(medians), np.log(args.sizes)))))
        print(f"{n:>8,} records | " + ", ".join(f"{a:.3f} ({b:.3f})" for a, b in runs) + " | "
              + ", ".join(f"{e:,.0f} ({e / n - 1:+.0%})" for e in estimates))
    print(f"({time.perf_counter() - start:.0f} s)")

if __name__ == "__main__":
    main()
