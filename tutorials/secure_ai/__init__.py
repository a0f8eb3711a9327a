"""Secure-AI's helper package: the plumbing behind the tutorial notebooks.

One concern per module:

* :mod:`secure_ai.data` - MNIST from ``$SECURE_AI_DATA``, as tensors, split among data owners
* :mod:`secure_ai.training` - models, local train/evaluate loops, FedAvg, weights <-> arrays
* :mod:`secure_ai.plots` - digit grids, per-owner label histograms, learning curves
* :mod:`secure_ai.workers` - data owners as PySyft 0.9.5 datasites (imports syft)
* :mod:`secure_ai.pointers` - pointers to a datasite's objects: send, compute remotely, fetch (Part 1)
* :mod:`secure_ai.federated` - FedAvg whose local updates run on the owners' datasites (Part 2)
* :mod:`secure_ai.privacy` - noise mechanisms, DP-SGD with Opacus, per-owner privacy ledgers (Part 3)
* :mod:`secure_ai.secret_sharing` - additive secret sharing and per-round pairwise masks (Part 4)
* :mod:`secure_ai.secagg` - double-masked secure aggregation and the owners' checks on the aggregator (Part 4)
* :mod:`secure_ai.encryption` - CKKS encryption of model updates, and a key holder that checks sums (Part 4)
* :mod:`secure_ai.attacks` - gradient inversion, label inference, membership inference, the DP bound (Part 5)
* :mod:`secure_ai.scale` - concurrent rounds, deadlines, dropouts, FedAvgM; owner processes (Part 6)
* :mod:`secure_ai.syft_patches` - the syft 0.9.5 defects we fix, in one place
* :mod:`secure_ai.quiet` - hides syft's log noise
* :mod:`secure_ai.runtime` - one torch thread, and freed memory handed back (small CPU machines)
* :mod:`secure_ai.memory` - memory as a cgroup counts it (proportional set size of a process tree)

Modules that import syft, Opacus or TenSEAL are not imported here, so ``import secure_ai`` stays fast.
"""
__all__ = ["data", "training", "plots"]
