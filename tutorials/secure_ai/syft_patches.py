"""Three bugs of syft 0.9.5 on our path, fixed in one place. syft is abandoned upstream, so we patch it here.

1. Slow calls. ``attach_attribute_to_syft_object`` (syft/types/syft_object.py) walks every
   ``collections.abc.Sequence`` it meets in a result, and ``bytes``/``str`` are Sequences: every byte of a
   serialized data blob costs a Python ``isinstance`` check (47 million for one 30,000-image asset, 16 s).
   The fix treats ``str``/``bytes``/``bytearray``/``memoryview`` as leaves; attributes still reach every
   nested syft object.
2. Run limits not enforced. ``UserCodeService.is_execution_allowed`` calls ``output_policy.is_valid()``
   but ignores a ``False`` answer, so an owner's approval "for at most N runs"
   (``OutputPolicyExecuteCount(limit=N)``) allowed any number of runs. The fix refuses the run once the
   policy says it is used up.
3. Results of pointer operations unreadable. ``ActionService.has_read_permission_for_action_result``
   requires READ on every input of an action, but asks the store for one row holding all the inputs'
   ids at once: with two different inputs (``x + y``, ``x * 2``) no row matches, and a data scientist
   cannot read the result even of its own objects. The fix applies the same rule input by input.

:func:`apply` is idempotent; importing :mod:`secure_ai.workers` applies it.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

_LEAVES = (str, bytes, bytearray, memoryview)
_applied = False


def attach_attribute_to_syft_object(result: Any, attr_dict: dict[str, Any]) -> None:
    """syft's function, minus the walk through the bytes of strings and blobs."""
    from syft.types.syft_object import Err, Ok, SyftBaseObject

    if isinstance(result, Ok):
        iterator = (result.ok(),)
    elif isinstance(result, Err):
        iterator = (result.err(),)
    elif isinstance(result, Mapping):
        iterator = result.values()
    elif isinstance(result, _LEAVES):
        return
    elif isinstance(result, Sequence):
        iterator = result
    else:
        iterator = (result,)
    for obj in iterator:
        if isinstance(obj, SyftBaseObject):
            for name, value in attr_dict.items():
                setattr(obj, name, value)
            for field in obj.model_fields:
                attach_attribute_to_syft_object(getattr(obj, field), attr_dict)


def is_execution_allowed(self, code, context, output_policy):
    """syft's check, plus: a valid-looking output policy that answers ``is_valid() == False`` refuses."""
    from syft.service.code.user_code_service import IsExecutionAllowedEnum

    allowed = _original_is_execution_allowed(self, code, context, output_policy)
    if allowed is IsExecutionAllowedEnum.ALLOWED and output_policy is not None:
        if not output_policy.is_valid(context):
            return IsExecutionAllowedEnum.INVALID_OUTPUT_POLICY
    return allowed


def has_read_permission_for_action_result(self, context, action) -> bool:
    """syft's rule (READ on every input of the action), checked input by input."""
    from syft.service.action.action_permissions import ActionObjectREAD

    inputs = [*action.args, *action.kwargs.values(), action.remote_self]
    return all(
        self.stash.has_permission(ActionObjectREAD(uid=uid, credentials=context.credentials))
        for uid in inputs
        if uid is not None
    )


_original_is_execution_allowed = None
_original_attach = None
_original_has_read_permission = None


def apply() -> None:
    """Install the fixes into the imported syft modules (safe to call more than once)."""
    global _applied, _original_is_execution_allowed, _original_attach, _original_has_read_permission
    if _applied:
        return
    import syft.service.service as service_module
    import syft.types.syft_object as syft_object_module
    from syft.service.action.action_service import ActionService
    from syft.service.code.user_code_service import UserCodeService

    _original_attach = syft_object_module.attach_attribute_to_syft_object
    syft_object_module.attach_attribute_to_syft_object = attach_attribute_to_syft_object
    service_module.attach_attribute_to_syft_object = attach_attribute_to_syft_object
    _original_is_execution_allowed = UserCodeService.is_execution_allowed
    UserCodeService.is_execution_allowed = is_execution_allowed
    _original_has_read_permission = ActionService.has_read_permission_for_action_result
    ActionService.has_read_permission_for_action_result = has_read_permission_for_action_result
    _applied = True
