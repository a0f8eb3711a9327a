"""Secure-AI's helper package: the plumbing behind the tutorial notebooks.

One concern per module, in four layers: a module imports only from its own layer or an earlier one, and
nothing in a circle (``tests/test_layout.py`` checks both).

L0, plumbing:

* :mod:`secure_ai.quiet` - hides syft's log noise and Opacus's warnings
* :mod:`secure_ai.runtime` - one torch thread, and freed memory handed back (small CPU machines)
* :mod:`secure_ai.memory` - memory as a cgroup counts it (proportional set size of a process tree)

L1, machine learning and maths, offline (no syft; code that runs on a datasite imports only these):

* :mod:`secure_ai.data` - MNIST from ``$SECURE_AI_DATA``, as tensors, split among data owners
* :mod:`secure_ai.training` - models, local train/evaluate loops, FedAvg, weights <-> arrays, and
  ``checked_model``, the owner's bounds on a training message
* :mod:`secure_ai.plots` - every figure of the series
* :mod:`secure_ai.privacy` - noise mechanisms, accounting and ledgers, the DP bound on attacks (Part 3)
* :mod:`secure_ai.dp_sgd` - DP-SGD with Opacus (Part 3)
* :mod:`secure_ai.features` - handcrafted ScatterNet features, normalized per image, for DP-SGD (Part 3)
* :mod:`secure_ai.attacks` - what one update leaks: labels, gradient inversion, identification (Part 6)
* :mod:`secure_ai.membership` - what a trained model leaks: membership inference, its targets, ROC (Part 6)
* :mod:`secure_ai.costs` - time, bytes and error each protection costs per round (Parts 5, 6)
* :mod:`secure_ai.secret_sharing` - fixed point, additive sharing, key agreement, pairwise masks (Part 4)
* :mod:`secure_ai.encryption` - CKKS encryption of model updates, and a key holder that checks sums (Part 5)
* :mod:`secure_ai.imprint` - what one MLP update gives away in closed form: analytic, imprint weights (Part 6)

L2, the syft gateway (import syft through :mod:`secure_ai.datasites`):

* :mod:`secure_ai.syft_patches` - the syft 0.9.5 defects we fix, in one place (the list of every fix)
* :mod:`secure_ai.syft_servers` - its fixes for HTTP datasites as processes and the wire to them
* :mod:`secure_ai.review` - what an owner is shown of a code request, and what an approval binds to
* :mod:`secure_ai.datasites` - the data owner's side: datasites, reviews and approvals, server processes
* :mod:`secure_ai.remote` - the data scientist's side: one way to request a function and to run it

L3, one workflow per chapter:

* :mod:`secure_ai.pointers` - send, compute remotely, fetch (Part 1)
* :mod:`secure_ai.federated` - FedAvg whose local updates run on the owners' datasites (Part 2)
* :mod:`secure_ai.dp_fedavg` - federated DP-SGD, record-level DP per owner: policies, checks, budgets (Part 3)
* :mod:`secure_ai.secagg` - double-masked secure aggregation and the owners' checks on the aggregator (Part 4)
* :mod:`secure_ai.aggregator` - the aggregator's side: a secure round, and rounds run in process (Part 4)
* :mod:`secure_ai.scale` - concurrent rounds, deadlines, dropouts, FedAvgM (Part 7)

Notebooks import modules under the same short names: ``from secure_ai import federated as fl``,
``training as tr``, ``privacy as dp``, ``secret_sharing as ss``, ``encryption as he`` and
``attacks as at``; the other modules keep their names (``from secure_ai import dp_sgd, plots``).

Modules that import syft, Opacus or TenSEAL are not imported here, so ``import secure_ai`` stays fast.
"""
__all__ = ["data", "training", "plots"]
