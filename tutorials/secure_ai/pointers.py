"""Part 1's workflow: pointers, computing on a datasite's objects from far away, the PySyft 0.9.5 way.

A data scientist sends an object to a datasite and keeps a *pointer*: where the object lives and its id,
and no data. Operations on pointers (``x + y``, ``x.exp()``, ``x @ w``) are sent to the datasite, run
there, and give new pointers; ``.get()`` brings a result back, if the owner's permissions allow it.

Two things in syft 0.9.5 stand in the way, and this module handles both:

* pointer operations ("eager execution") are off by default; the owner turns them on with one settings
  call (:func:`enable_pointer_ops`). Stock syft checks that setting only in the client; with
  :mod:`secure_ai.syft_patches` (fix 4) the datasite itself refuses operations while it is off;
* the datasite refuses to let you read the result of an operation with two different inputs
  (``x + y``), even on your own objects: a syft bug, fixed in :mod:`secure_ai.syft_patches` (fix 3).

Plain syft calls print server tracebacks on refusals; :func:`fetch` and :func:`read_private` raise a
:class:`PermissionError` with one readable line instead.
"""
from __future__ import annotations

from typing import Any

from .datasites import DataOwner, sy  # first: it imports syft quietly, and patches it
from .quiet import quiet

# isort: split
from syft.service.action.action_data_empty import ActionDataEmpty  # syft, after secure_ai.datasites

__all__ = ["enable_pointer_ops", "send", "describe", "fetch", "read_private", "stored_on"]


def enable_pointer_ops(owner: DataOwner) -> None:
    """Owner side: let clients compute on pointers to objects on ``owner``'s datasite.

    Clients that logged in before this call must log in again to see the change.
    """
    owner.check_running()
    with quiet():
        owner.client.settings.update(eager_execution_enabled=True)


def _is_pointer(obj: Any) -> bool:
    return isinstance(obj, sy.ActionObject) and obj.syft_server_uid is not None


def send(value: Any, client) -> sy.ActionObject:
    """Data-scientist side: send ``value`` (a tensor or array you own) to ``client``'s datasite.

    Returns a pointer that holds no data: every operation on it runs on the datasite.
    """
    if not client.api.metadata.eager_execution_enabled:
        raise RuntimeError(
            f"{client.name} does not run operations on pointers; the owner must call enable_pointer_ops "
            "and you must log in again"
        )
    with quiet():
        sent = sy.ActionObject.from_obj(value).send(client)
    pointer = sent.as_empty()  # same id, no data
    pointer.syft_action_data_cache = ActionDataEmpty(syft_internal_type=type(value))
    pointer._set_obj_location_(sent.syft_server_location, sent.syft_client_verify_key)
    pointer.syft_point_to(sent.syft_server_uid)
    pointer.__post_init__()  # syft attaches the "run this on the datasite" hooks once the location is known
    return pointer


def describe(pointer: sy.ActionObject) -> dict[str, str]:
    """What a pointer holds: where the object lives, its id, its type, and whether any data is here."""
    if not _is_pointer(pointer):
        raise TypeError(f"not a pointer to a datasite object: {type(pointer).__name__}")
    with quiet():
        api = pointer.get_api()
    cache = pointer.syft_action_data_cache
    if isinstance(cache, ActionDataEmpty):
        kind = cache.syft_internal_type
        kind = "not known here" if kind is type(None) else f"{kind.__module__}.{kind.__name__}"
        held = "none"
    else:
        kind = f"{type(cache).__module__}.{type(cache).__name__}"
        held = "the mock's version (fake data)" if pointer.is_mock else "a local copy"
    return {
        "lives on": f"{api.server_name} (datasite {pointer.syft_server_uid.short()})",
        "object id": str(pointer.id.id),
        "type": kind,
        "data held here": held,
    }


def fetch(pointer: sy.ActionObject) -> Any:
    """``pointer.get()``: bring the object home. :class:`PermissionError` if the owner has not allowed it."""
    if not _is_pointer(pointer):
        raise TypeError(f"not a pointer to a datasite object: {type(pointer).__name__}")
    from syft.types.errors import SyftException

    with quiet():
        api = pointer.get_api()
        try:
            return pointer.get()
        except SyftException:
            exists = api.services.action.exists(pointer.id.id)
    if exists:
        raise PermissionError(
            f"{api.server_name} has not given you permission to read object {pointer.id.id.short()}"
        )
    raise LookupError(f"{api.server_name} holds no object {pointer.id.id.short()}")


def read_private(asset) -> Any:
    """Data-scientist side: an asset's private data. :class:`PermissionError` unless the owner allows it."""
    with quiet():
        data = asset.data  # syft prints a SyftError and returns None when you may not read it
    if data is None:
        raise PermissionError(
            f"no permission to read the private data of asset {asset.name!r}: look at asset.mock instead, "
            "or ask the owner to run your code"
        )
    return data


def stored_on(owner: DataOwner, pointer: sy.ActionObject) -> Any:
    """Owner side: the object behind a pointer, from ``owner``'s own store (``LookupError`` if absent)."""
    owner.check_running()
    from syft.types.errors import SyftException

    with quiet():
        try:
            return owner.client.api.services.action.get(pointer.id.id).syft_action_data
        except SyftException:
            pass
    raise LookupError(f"{owner.name} holds no object {pointer.id.id.short()}")
