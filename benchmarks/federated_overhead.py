"""How much does syft add to federated training? One FedAvg round through syft vs one plain PyTorch epoch.

Both sides do the same work: one pass of SGD (momentum 0.9, batch 64) over the 60,000 MNIST training
images with the same model. Plain PyTorch does it in one loop; the federated round sends the global
weights to two in-memory datasites (joe and jane, 30,000 private images each), runs one local epoch on
each through an approved ``syft_function``, brings the weights back and averages them.

Measured, each ``--repeats`` times (interleaved, so that a busy machine slows all of them alike), medians:

* ``plain``        one epoch over 60,000 samples in plain PyTorch (tensors already normalized in memory);
* ``fed vector``   one round whose message is the model as ONE flat float32 vector (``{"vector": v}``);
* ``fed dict``     one round whose message is the model as a ``{name: array}`` dict (``get_weights``);
* ``fed unpatched`` (with ``--unpatched``) the vector round with syft's original, per-byte
  ``attach_attribute_to_syft_object`` (see ``secure_ai/syft_patches.py``): about 1 s more per call here.

Setup (datasites, upload, approval) is timed once and reported apart. torch runs on one thread by default
(``--threads``), as in the notebook: with two threads and another program on the other core, an epoch here
took 90 s instead of 9 s. Wall time and CPU time (this
process) are both printed: on a shared machine the CPU-time ratio is the steadier one.

Usage, from the repository root::

    SECURE_AI_DATA=/path/with/MNIST .venv/bin/python benchmarks/federated_overhead.py [--repeats 3]
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tutorials"))

import torch  # noqa: E402
from secure_ai import data  # noqa: E402
from secure_ai import training as tr  # noqa: E402
from secure_ai.quiet import quiet  # noqa: E402

with quiet():  # keep syft's own function before secure_ai.datasites patches it, for --unpatched
    import syft.service.service as syft_service
    import syft.types.syft_object as syft_object

    ORIGINAL_ATTACH = syft_object.attach_attribute_to_syft_object

from secure_ai import federated as fl  # noqa: E402
from secure_ai.datasites import DataOwner, shutdown_all  # noqa: E402

LR, MOMENTUM, BATCH = 0.02, 0.9, 64


# --- code that runs on the data owners' datasites (syft sends its source; it must be self-contained) ---
def train_vector(images, labels, weights):
    import time

    import torch
    from secure_ai.data import normalize
    from secure_ai.training import CNN, model_to_vector, train_epoch, vector_to_model

    start = time.perf_counter()
    model = vector_to_model(weights["vector"], CNN(channels=tuple(int(c) for c in weights["channels"])))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    loss = train_epoch(model, normalize(images), torch.from_numpy(labels), optimizer, batch_size=64,
                       progress=False)
    return {"weights": {"vector": model_to_vector(model).numpy()}, "n_samples": len(labels), "loss": loss,
            "train_s": time.perf_counter() - start}


def train_dict(images, labels, weights):
    import time

    import torch
    from secure_ai.data import normalize
    from secure_ai.training import CNN, get_weights, set_weights, train_epoch

    start = time.perf_counter()
    channels = (weights["net.0.weight"].shape[0], weights["net.3.weight"].shape[0])
    model = set_weights(CNN(channels=channels), weights)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    loss = train_epoch(model, normalize(images), torch.from_numpy(labels), optimizer, batch_size=64,
                       progress=False)
    return {"weights": get_weights(model), "n_samples": len(labels), "loss": loss,
            "train_s": time.perf_counter() - start}


# --- data-scientist side ---------------------------------------------------------------------------
def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def plain_epoch(channels, seed):
    x, y = data.mnist_tensors(True)
    tr.set_seed(seed)
    model = tr.CNN(channels=channels)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    tr.train_epoch(model, x, y, optimizer, BATCH, progress=False)


def fed_round(clients, function_name, message):
    _, results = fl.fedavg_round(clients, function_name, message)
    return sum(r["train_s"] for r in results.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="measurements of each kind (median is shown)")
    parser.add_argument("--channels", type=int, nargs=2, default=(8, 16), help="CNN channels")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1, as the notebook: steady when other programs share the CPU)")
    parser.add_argument("--unpatched", action="store_true", help="also time rounds with syft's per-byte walk")
    args = parser.parse_args()
    if args.repeats < 2:
        parser.error("--repeats must be at least 2")
    channels = tuple(args.channels)
    torch.set_num_threads(args.threads)
    tr.set_seed(0)
    load_start = os.getloadavg()[0]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"load average {load_start:.2f}; CNN{channels}, SGD lr {LR} momentum {MOMENTUM}, batch {BATCH}")

    # Setup, excluded from the ratio: datasites, private uploads, accounts, requests, approvals.
    start = time.perf_counter()
    images, labels = data.mnist_raw(True)
    data.mnist_tensors(True)  # plain PyTorch gets its normalized tensors ready too
    parts = data.partition_iid(len(labels), 2, seed=0)
    owners = {name: DataOwner(name) for name in ("joe", "jane")}
    for owner, idx in zip(owners.values(), parts):
        fl.upload_mnist(owner, images[idx], labels[idx])
        owner.add_data_scientist("ds@example.org", "benchmark")
    clients = {name: owner.login("ds@example.org", "benchmark") for name, owner in owners.items()}
    vector_runs = args.repeats * (2 if args.unpatched else 1)
    for name, client in clients.items():
        fl.request_training(client, train_vector, rounds=vector_runs)
        fl.request_training(client, train_dict, rounds=args.repeats)
        for function in ("train_vector", "train_dict"):
            owners[name].code_of(function)  # an approval binds to the code the owner was shown
            owners[name].approve(function)
    setup_s = time.perf_counter() - start

    model = tr.CNN(channels=channels)
    vector_message = {"vector": tr.model_to_vector(model).numpy(), "channels": list(channels)}
    dict_message = tr.get_weights(model)
    times: dict[str, list[tuple[float, float, float]]] = {"plain": [], "fed vector": [], "fed dict": []}
    for i in range(args.repeats):
        _, wall, cpu = timed(lambda i=i: plain_epoch(channels, seed=i))
        times["plain"].append((wall, cpu, wall))
        for label, function_name, message in (("fed vector", "train_vector", vector_message),
                                              ("fed dict", "train_dict", dict_message)):
            train_s, wall, cpu = timed(lambda f=function_name, m=message: fed_round(clients, f, m))
            times[label].append((wall, cpu, train_s))
        print(f"  repeat {i + 1}/{args.repeats}: " + ", ".join(
            f"{k} {v[-1][0]:.2f} s" for k, v in times.items()), flush=True)

    if args.unpatched:
        syft_object.attach_attribute_to_syft_object = ORIGINAL_ATTACH
        syft_service.attach_attribute_to_syft_object = ORIGINAL_ATTACH
        times["fed unpatched"] = []
        for i in range(args.repeats):
            train_s, wall, cpu = timed(lambda: fed_round(clients, "train_vector", vector_message))
            times["fed unpatched"].append((wall, cpu, train_s))
            print(f"  unpatched repeat {i + 1}/{args.repeats}: {wall:.2f} s", flush=True)
    shutdown_all()

    med = {k: [statistics.median(x[j] for x in v) for j in range(3)] for k, v in times.items()}
    plain_wall, plain_cpu, _ = med["plain"]
    n_params = len(vector_message["vector"])
    print(f"\nsetup (2 datasites, upload 2 x 30,000 uint8 images, accounts, approvals): {setup_s:.1f} s")
    print(f"message: {n_params:,} float32 weights = {4 * n_params / 1e3:.0f} kB each way per owner\n")
    print(f"{'median of ' + str(args.repeats):<16}{'wall s':>8}{'cpu s':>8}{'train s':>9}{'syft s':>8}"
          f"{'wall ratio':>12}{'cpu ratio':>11}")
    for label, (wall, cpu, train_s) in med.items():
        syft_s = "" if label == "plain" else f"{wall - train_s:8.2f}"
        print(f"{label:<16}{wall:8.2f}{cpu:8.2f}{train_s:9.2f}{syft_s:>8}{wall / plain_wall:12.2f}"
              f"{cpu / plain_cpu:11.2f}")
    if not args.unpatched:
        print(f"{'fed unpatched':<16}  not run (--unpatched): about 1 s more per call")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1e6 if sys.platform == "darwin" else 1e3)
    print("\n'train s': time inside the owners' functions (normalize + local epoch), summed over owners;")
    print("'syft s' = wall - train s: sending, policies, the run on the mock, storing, fetching, FedAvg.")
    print(f"ratio = federated round / plain epoch. Goal: <= 1.5. Peak memory {peak:.0f} MB. "
          f"Load average {load_start:.2f} -> {os.getloadavg()[0]:.2f} (shared machine: timings are noisy).")


if __name__ == "__main__":
    main()
