"""Secure-AI's helper package: the plumbing behind the tutorial notebooks.

One concern per module:

* :mod:`secure_ai.data` - MNIST from ``$SECURE_AI_DATA``, as tensors, split among data owners
* :mod:`secure_ai.training` - models, local train/evaluate loops, FedAvg, weights <-> arrays
* :mod:`secure_ai.plots` - digit grids, per-owner label histograms, learning curves
* :mod:`secure_ai.workers` - data owners as PySyft 0.9.5 datasites (imports syft)
* :mod:`secure_ai.federated` - FedAvg whose local updates run on the owners' datasites
* :mod:`secure_ai.syft_patches` - the two syft 0.9.5 bugs we fix, in one place
* :mod:`secure_ai.quiet` - hides syft's log noise

Modules that import syft are not imported here, so ``import secure_ai`` stays fast.
"""
__all__ = ["data", "training", "plots"]
