"""Federated learning with N owners as real HTTP datasites: setup, sequential vs concurrent rounds, memory.

For each N (``--owners 1 2 5 10``): N PySyft 0.9.5 HTTP datasites, each its own process on 127.0.0.1 with
``--samples`` MNIST digits, the MLP 784-500-10, one local epoch per round
(``secure_ai.scale.train_local_epoch``).
Measured per N:

* setup: start the servers, upload, accounts, request and approval (seconds, all owners);
* a round sent one owner after another and one sent to all at once (``secure_ai.scale.Federation``),
  alternated ``--repeats`` times after a warm-up round (each server imports PyTorch on its first call);
  medians;
* syft seconds per call: a call's wall time as the data scientist saw it minus the training time inside the
  owner's function (median over the sequential calls, where owners do not compete for the CPU);
* memory after the rounds, as proportional set sizes (PSS, :mod:`secure_ai.memory`: shared pages split
  among the processes that share them, so the figures add up): each owner server's, all owners' together,
  this process's (the data scientist's), and the total of this process and everything it started;
* bytes per round: the message and a reply as syft serializes them, times N, both directions.

Timings on a shared machine are noisy: the load average is printed with them. Usage, from the repository
root::

    SECURE_AI_DATA=/path/with/MNIST .venv/bin/python benchmarks/federated_scale.py --owners 1 2 5 10
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tutorials"))

from secure_ai import data, datasites, memory, runtime, scale  # noqa: E402
from secure_ai import federated as fl  # noqa: E402
from secure_ai import training as tr  # noqa: E402
from secure_ai.datasites import DataOwner, sy  # noqa: E402

RECIPE = {"model": "mlp", "lr": 0.05, "momentum": 0.5, "batch_size": 32}
EMAIL, PASSWORD = "bench@example.org", "federated-scale"


def start(n: int, samples: int, rounds: int):
    images, labels = data.mnist_raw(True)
    owners, trainers = {}, {}
    for i in range(n):
        name = f"owner{i}"
        lo = (i * samples) % (len(labels) - samples)
        owner = DataOwner(name, port=datasites.free_port())
        fl.upload_mnist(owner, images[lo:lo + samples], labels[lo:lo + samples], mock_size=16)
        owner.add_data_scientist(EMAIL, PASSWORD)
        client = owner.login(EMAIL, PASSWORD)
        fl.request_training(client, scale.train_local_epoch, rounds=rounds)
        owner.code_of("train_local_epoch")
        owner.approve("train_local_epoch")
        owners[name] = owner
        trainers[name] = scale.remote_trainer(client, "train_local_epoch", max_samples=samples)
    return owners, trainers


def measure(n: int, samples: int, repeats: int) -> dict:
    tic = time.perf_counter()
    owners, trainers = start(n, samples, rounds=2 * repeats + 1)
    setup_s = time.perf_counter() - tic
    concurrent, sequential = scale.Federation(trainers), scale.Federation(trainers, concurrent=False)
    tr.set_seed(0)
    vector = tr.model_to_vector(tr.MLP()).numpy()
    vector, _ = concurrent.round(vector, {**RECIPE, "seed": 0})  # warm-up: PyTorch imports on each server
    for r in range(repeats):
        for fed in (sequential, concurrent):
            vector, record = fed.round(vector, {**RECIPE, "seed": 1 + r})
            if record.dropped:
                raise RuntimeError(f"round with {n} owners lost {record.dropped}")
    syft_s = [rec.owner_seconds[k] - rec.metrics[k]["train_s"]
              for rec in sequential.records for k in rec.answered]
    message = {**RECIPE, "seed": 0, "vector": vector}
    reply = {"weights": {"vector": vector}, "n_samples": samples, "loss": 0.0, "train_s": 0.0}
    wire = lambda obj: len(sy.serialize(obj, to_bytes=True))
    owner_mb = [datasites.memory_mb(o) for o in owners.values()]
    ds_mb, total_mb = memory.pss(os.getpid()) / 1e6, memory.tree_pss(os.getpid()) / 1e6
    datasites.shutdown_all()
    return {"N": n, "setup s": setup_s,
            "sequential s": statistics.median(r.seconds for r in sequential.records),
            "concurrent s": statistics.median(r.seconds for r in concurrent.records[1:]),
            "syft s/call": statistics.median(syft_s),
            "owner MB": max(owner_mb), "all owners MB": sum(owner_mb), "DS MB": ds_mb, "total MB": total_mb,
            "MB/round": n * (wire(message) + wire(reply)) / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--owners", type=int, nargs="+", default=[1, 2, 5, 10], help="values of N")
    parser.add_argument("--samples", type=int, default=3000, help="MNIST digits per owner")
    parser.add_argument("--repeats", type=int, default=2, help="rounds of each kind (median is shown)")
    args = parser.parse_args()
    if min(args.owners) < 1 or args.samples < 32 or args.repeats < 1:
        parser.error("--owners >= 1, --samples >= 32 and --repeats >= 1")
    runtime.configure()
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; MLP, {args.samples} digits per "
          f"owner, {args.repeats} rounds of each kind after a warm-up", flush=True)
    rows = []
    for n in args.owners:
        rows.append(measure(n, args.samples, args.repeats))
        print(f"  N = {n} done, load average {os.getloadavg()[0]:.2f}", flush=True)
    columns = list(rows[0])
    print("\n" + "".join(f"{c:>14}" for c in columns) + f"{'conc/seq':>10}")
    for row in rows:
        print("".join(f"{row[c]:>14.2f}" if isinstance(row[c], float) else f"{row[c]:>14}" for c in columns)
              + f"{row['concurrent s'] / row['sequential s']:>10.2f}")
    print("\nconc/seq: concurrent over sequential round time (goal with 2 owners on 2 cores: <= 0.65).")
    print("MB: proportional set sizes after the rounds (owner MB: the largest owner's); DS + all owners is")
    print("the total but for multiprocessing's helper processes (a few MB).")
    print(f"load average at the end {os.getloadavg()[0]:.2f} (shared machine: timings are noisy).")


if __name__ == "__main__":
    main()
