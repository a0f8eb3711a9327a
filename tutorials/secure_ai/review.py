"""What a data owner is shown of a code request before approving it: code, inputs, run limit, digest.

:class:`CodeReview` is the text an owner reads (:meth:`secure_ai.datasites.DataOwner.code_of`) and what an
approval binds to: the request's id and a digest of its code, inputs and policies. It reads syft's objects
(a request, its code, the owner's datasets) and imports nothing of syft.
"""
from __future__ import annotations

import hashlib


def inputs_of(code, datasets) -> dict[str, str]:
    """What each argument of ``code`` is bound to, in words: an asset of ``datasets`` (the owner's) or a
    data type."""
    assets = {
        str(asset.action_id): f"asset {dataset.name}/{asset.name}"
        for dataset in datasets for asset in dataset.assets
    }
    described = {}
    for kwargs in (code.input_policy_init_kwargs or {}).values():
        for arg, rule in kwargs.items():
            uid = getattr(rule, "val", rule)
            if hasattr(rule, "type"):
                described[arg] = f"any {rule.type.__name__} of the data scientist's"
            else:
                described[arg] = assets.get(str(uid), f"object {str(uid)[:8]} (not one of your assets)")
    return dict(sorted(described.items()))


class CodeReview(str):
    """What an owner was shown of one pending request: prints as a header line and the code.

    ``request_id`` and ``digest`` (SHA-256 of the function name, code, inputs and policies) bind an
    approval to exactly this request and this code; ``inputs`` says what each argument is bound to
    (``"asset <dataset>/<asset>"`` for this owner's assets).
    """

    request_id: str
    digest: str
    function_name: str
    inputs: dict[str, str]

    @classmethod
    def of(cls, request, code, datasets) -> CodeReview:
        """The review of ``request``, whose one piece of code is ``code``; ``datasets``: the owner's."""
        inputs = inputs_of(code, datasets)
        limits = {k: v for k, v in (code.output_policy_init_kwargs or {}).items() if k != "id"}
        policies = f"{code.input_policy_type.__name__} {code.output_policy_type.__name__}{limits}"
        digest = hashlib.sha256(
            "\0".join([code.service_func_name, code.raw_code, repr(inputs), policies]).encode()
        ).hexdigest()
        once = code.output_policy_type.__name__ == "OutputPolicyExecuteOnce"
        limit = limits.get("limit", 1 if once else None)
        runs = f"at most {limit} run{'s' * (limit != 1)}" if limit else code.output_policy_type.__name__
        header = (f"# request {str(request.id)[:8]}: {runs}, digest {digest[:12]}\n# inputs: "
                  + ", ".join(f"{k} = {v}" for k, v in inputs.items()))
        review = cls(f"{header}\n{code.raw_code}")
        review.request_id, review.digest, review.inputs = str(request.id), digest, inputs
        review.function_name = code.service_func_name
        return review
