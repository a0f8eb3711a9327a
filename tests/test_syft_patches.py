"""secure_ai.syft_patches: both fixes are installed and do what they say.

The end-to-end proof that run limits hold is in test_workers.py
(test_approved_request_runs_at_most_the_approved_number_of_times).
"""
from typing import Any

import pytest
from secure_ai import syft_patches
from secure_ai.workers import sy  # noqa: F401  (importing workers applies the patches)
from syft.types.syft_object import SyftObject


class Box(SyftObject):
    """A minimal syft object holding anything."""

    __canonical_name__ = "SecureAITestBox"
    __version__ = 1
    payload: Any = None


class ExplodingBytes(bytes):
    """bytes that fail if anybody walks through them byte by byte."""

    def __iter__(self):
        raise AssertionError("walked into a bytes blob")


def test_patches_are_installed_in_syft():
    import syft.service.service as service_module
    import syft.types.syft_object as syft_object_module
    from syft.service.code.user_code_service import UserCodeService

    assert syft_object_module.attach_attribute_to_syft_object is syft_patches.attach_attribute_to_syft_object
    assert service_module.attach_attribute_to_syft_object is syft_patches.attach_attribute_to_syft_object
    from syft.service.action.action_service import ActionService

    assert UserCodeService.is_execution_allowed is syft_patches.is_execution_allowed
    fixed = syft_patches.has_read_permission_for_action_result
    assert ActionService.has_read_permission_for_action_result is fixed
    syft_patches.apply()  # idempotent
    assert UserCodeService.is_execution_allowed is syft_patches.is_execution_allowed


def test_original_walks_bytes_and_fixed_one_does_not():
    blob = Box(payload=ExplodingBytes(b"\x00" * 1000))
    with pytest.raises(AssertionError, match="walked into"):
        syft_patches._original_attach(blob.payload, {"syft_server_location": None})
    syft_patches.attach_attribute_to_syft_object(blob, {"syft_server_location": None})
    syft_patches.attach_attribute_to_syft_object("a string", {"syft_server_location": None})


def test_fixed_walk_still_reaches_nested_syft_objects():
    from syft.types.uid import UID

    location = UID()
    inner = Box(payload="inner")
    outer = Box(payload=[inner, ExplodingBytes(b"xyz")])
    syft_patches.attach_attribute_to_syft_object([outer], {"syft_server_location": location})
    assert outer.syft_server_location == location
    assert inner.syft_server_location == location


def test_result_of_two_inputs_is_readable_with_the_fix_only(monkeypatch):
    """Fix 3: x + y on your own pointers; syft's original check refuses to let you read the result."""
    import numpy as np
    from secure_ai.pointers import enable_pointer_ops, fetch, send
    from secure_ai.workers import DataOwner
    from syft.service.action.action_service import ActionService

    with DataOwner("patch-joe") as owner:
        enable_pointer_ops(owner)
        owner.add_data_scientist("ds@example.org", "pw")
        ds = owner.login("ds@example.org", "pw")
        x, y = send(np.array([1.0, 2.0]), ds), send(np.array([10.0, 20.0]), ds)
        np.testing.assert_array_equal(fetch(x + y), [11.0, 22.0])
        monkeypatch.setattr(ActionService, "has_read_permission_for_action_result",
                            syft_patches._original_has_read_permission)
        with pytest.raises(PermissionError):
            fetch(x + y)
