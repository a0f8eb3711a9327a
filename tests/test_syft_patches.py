"""secure_ai.syft_patches: the fixes are installed and hold against a data scientist who cheats.

The end-to-end proof that run limits hold in this process is in test_datasites.py
(test_approved_request_runs_at_most_the_approved_number_of_times); here, in a spawned server process.
"""
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest
from secure_ai import syft_patches
from secure_ai.datasites import sy  # noqa: F401  (importing datasites applies the patches)
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
    import syft.server.uvicorn as uvicorn_module
    from syft.service.action.action_service import ActionService

    assert UserCodeService.is_execution_allowed is syft_patches.is_execution_allowed
    fixed = syft_patches.has_read_permission_for_action_result
    assert ActionService.has_read_permission_for_action_result is fixed
    assert ActionService.execute is syft_patches.execute
    assert uvicorn_module.run_uvicorn is syft_patches.run_uvicorn
    from syft.service.dataset.dataset_service import DatasetService

    assert DatasetService.add is syft_patches.add_dataset
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
    from secure_ai.datasites import DataOwner
    from secure_ai.pointers import enable_pointer_ops, fetch, send
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


PLAN_INPUT = np.zeros(6)  # syft's planify traces a function called with its default arguments


def _lineage(pointer):
    from syft.types.uid import LineageID

    return LineageID(pointer.id.id)


def _raw_action(op, remote_self, *args, **kwargs):
    """An action built by hand, as a client that skips syft's client-side checks would send it."""
    from syft.service.action.action_object import Action, ActionType

    return Action(path="numpy.ndarray", op=op, remote_self=_lineage(remote_self),
                  args=[_lineage(a) for a in args], kwargs={k: _lineage(v) for k, v in kwargs.items()},
                  action_type=ActionType.METHOD)


@pytest.fixture(scope="module")
def guarded():
    """A datasite with a private asset, pointer operations switched off, and a data scientist."""
    from secure_ai.datasites import DataOwner

    owner = DataOwner("guard-joe")
    owner.upload_dataset("numbers", private={"x": np.arange(6.0)}, mock={"x": np.zeros(6)})
    owner.add_data_scientist("ds@example.org", "pw")
    yield owner, owner.login("ds@example.org", "pw")
    owner.shutdown()


def test_pointer_operations_are_refused_server_side_while_switched_off(guarded, monkeypatch):
    """Fix 4: a data scientist's client that ignores the owner's setting still gets nothing run."""
    from secure_ai.pointers import enable_pointer_ops, fetch
    from secure_ai.quiet import quiet
    from syft.service.action.action_service import ActionService
    from syft.types.errors import SyftException

    owner, ds = guarded
    assert not ds.api.metadata.eager_execution_enabled
    with quiet():
        mine = sy.ActionObject.from_obj(np.ones(3)).send(ds)  # uploading an object stays allowed
        with pytest.raises(SyftException, match="operations on pointers are switched off"):
            ds.api.services.action.execute(_raw_action("__add__", mine, mine))
    # Stock syft 0.9.5 runs the very same action: the setting was read only on the client.
    monkeypatch.setattr(ActionService, "execute", syft_patches._original_execute)
    with quiet():
        result = ds.api.services.action.execute(_raw_action("__add__", mine, mine))
    monkeypatch.undo()
    np.testing.assert_array_equal(owner.client.api.services.action.get(result.id.id).syft_action_data, 2.0)
    enable_pointer_ops(owner)
    try:
        ds_again = owner.login("ds@example.org", "pw")
        with quiet():
            result = ds_again.api.services.action.execute(_raw_action("__add__", mine, mine))
        np.testing.assert_array_equal(fetch(result), 2.0)  # switched on: the owner allowed it
    finally:
        with quiet():
            owner.client.settings.update(eager_execution_enabled=False)


@pytest.mark.parametrize("route", ["self", "positional", "keyword", "plan"])
def test_every_route_to_the_private_asset_stays_unreadable(guarded, route):
    """Fix 3 and 4 against a data scientist who puts the private asset anywhere an action takes inputs."""
    from secure_ai.pointers import enable_pointer_ops, fetch
    from secure_ai.quiet import quiet
    from syft.types.errors import SyftException

    owner, _ = guarded
    enable_pointer_ops(owner)
    try:
        ds = owner.login("ds@example.org", "pw")
        private = ds.datasets["numbers"].assets["x"].pointer
        with quiet():
            mine = sy.ActionObject.from_obj(np.full(6, 10.0)).send(ds)
        if route == "plan":
            def add_one(x=PLAN_INPUT):
                return x + 1

            with quiet():
                plan = sy.planify(add_one).send(ds)
                with pytest.raises(SyftException, match="Plan calls are refused"):
                    ds.api.services.action.execute(_raw_action("__call__", plan, x=private))
            return
        action = {
            "self": _raw_action("__add__", private, mine),              # private + mine
            "positional": _raw_action("__add__", mine, private),        # mine + private
            "keyword": _raw_action("clip", mine, min=private),          # mine.clip(min=private)
        }[route]
        with quiet():
            result = ds.api.services.action.execute(action)
        stored = owner.client.api.services.action.get(result.id.id).syft_action_data
        assert np.asarray(stored).shape == (6,)  # it ran, on the private data ...
        with pytest.raises(PermissionError):
            fetch(result)                          # ... and the data scientist cannot read it
    finally:
        with quiet():
            owner.client.settings.update(eager_execution_enabled=False)


def test_a_spawned_http_server_enforces_run_limits(monkeypatch):
    """Fix 5: an owner's server started with *spawn* (syft's choice on macOS) runs a limit-2 function twice.

    Measured before this fix (issue 14.13): a spawned server imports stock syft, which ran a limit-2
    function 5 times out of 5. The child applies the fixes because it starts in syft_patches.run_uvicorn.
    (Called again with the *same* inputs, syft answers from its cache of the last run without running.)
    """
    import multiprocessing

    from secure_ai import datasites
    from secure_ai.datasites import DataOwner
    from secure_ai.quiet import quiet
    from secure_ai.remote import RemoteError, call
    from syft.service.policy.policy import OutputPolicyExecuteCount

    monkeypatch.setattr(multiprocessing, "Process", multiprocessing.get_context("spawn").Process)
    monkeypatch.setattr(multiprocessing, "Event", multiprocessing.get_context("spawn").Event)
    port = datasites.free_port()
    with DataOwner("spawnjoe", port=port) as owner:
        assert owner._handle.python_server is None  # a separate server process
        owner.upload_dataset("numbers", private={"x": np.arange(4.0)}, mock={"x": np.zeros(4)})
        owner.add_data_scientist("ds@example.org", "pw")
        ds = owner.login("ds@example.org", "pw")
        asset = ds.datasets["numbers"].assets["x"]

        def total(x, k):
            return float(x.sum()) + k

        with quiet():
            ds.code.request_code_execution(sy.syft_function(
                input_policy=sy.MixedInputPolicy(client=ds, x=asset, k=int),
                output_policy=OutputPolicyExecuteCount(limit=2))(total))
        owner.code_of("total")
        owner.approve("total")
        assert [call(ds.code.total, x=asset, k=k) for k in (1, 2)] == [7.0, 8.0]
        with pytest.raises(RemoteError, match="used up"):  # new inputs: a third run, refused
            call(ds.code.total, x=asset, k=3)
        assert owner.runs("total") == 2
    assert datasites.port_is_free(port)


# --- fix 7: nothing a guest can read is computed from the private arrays ----------------------------------
def _described(obj, depth: int = 0):
    """A syft object as the data scientist's client holds it: every field and every text it renders."""
    from syft.types.syft_object import SyftBaseObject

    if depth > 6:
        return "..."
    if isinstance(obj, SyftBaseObject):
        found = {field: _described(getattr(obj, field, None), depth + 1) for field in obj.model_fields}
        for render in ("__repr__", "__str__", "_repr_html_", "_repr_markdown_", "_coll_repr_"):
            try:
                found[render] = str(getattr(obj, render)()) if hasattr(obj, render) else None
            except Exception as error:  # noqa: BLE001 - a render that fails is what the guest sees
                found[render] = f"fails: {type(error).__name__}"
        return found
    if isinstance(obj, Mapping):
        return {str(key): _described(value, depth + 1) for key, value in obj.items()}
    if isinstance(obj, list | tuple | set) and any(isinstance(v, SyftBaseObject) for v in obj):
        return [_described(value, depth + 1) for value in obj]
    return repr(obj)


def _flat(tree, prefix=""):
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _flat(value, f"{prefix}.{key}")
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            yield from _flat(value, f"{prefix}[{i}]")
    else:
        yield prefix, tree


_VARYING = re.compile(  # ids, keys, times and dates, and an HTML table's random element id: never the same
    r"[0-9a-f]{8}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{12}|[0-9a-f]{64}|0x[0-9a-f]+"
    r"|\d{4}-\d\d-\d\d[ T][\d:.]+|[A-Z][a-z]{2} \d\d, \d{4}"
    r"|\b(?:table|search|numrows)[-_][0-9a-f]{8}\b|^ *\"[0-9a-f]{8}\",$", re.MULTILINE)


def guest_view(owner, email: str, password: str) -> dict[str, str]:
    """Everything a data scientist's account can list or fetch about ``owner``'s datasets, as strings,
    with ids, keys and times replaced (they differ between any two datasites)."""
    from secure_ai.quiet import quiet

    ds = owner.login(email, password)
    services = ds.api.services
    with quiet():
        seen = {"datasets": list(ds.datasets), "metadata": services.metadata.get_metadata()}
        for dataset in ds.datasets:
            seen[f"search {dataset.name}"] = services.dataset.search(name=dataset.name)
            for asset in dataset.assets:
                pointer = services.action.get_pointer(uid=asset.action_id)
                seen[f"{dataset.name}/{asset.name}"] = {
                    "by action id": services.dataset.get_assets_by_action_id(uid=asset.action_id),
                    "pointer": pointer, "mock": services.action.get_mock(uid=asset.action_id),
                }
                if pointer.syft_blob_storage_entry_id is not None:  # a large mock lives in blob storage
                    seen[f"{dataset.name}/{asset.name}"]["blob"] = services.blob_storage.read(
                        uid=pointer.syft_blob_storage_entry_id)
        described = _described(seen)  # (an asset's HTML asks for the private data, and shows the refusal)
    view = {}
    for key, value in _flat(described):
        if key.endswith((".syft_history_hash", ".utc_timestamp")):  # a hash of a random id; a time
            continue
        view[key] = _VARYING.sub("<varies>", str(value).replace(owner.name, "<owner>"))
    return view


def test_a_guest_sees_nothing_computed_from_the_private_arrays():
    """Fix 7. Two owners hold different private data (300 and 1,000 records, other values) behind the same
    mock. Whatever a data scientist lists or fetches is the same on both, apart from ids and times.

    Measured before this fix: ``mb_size`` (and the dataset table that shows it) gave each owner's exact
    size: 0.0208 and 0.0689 MB here, n = 257 for Part 3's owner (issue 18, leak 2). Now both show the
    mock's size.
    """
    from secure_ai.datasites import DataOwner

    mock = {"images": np.zeros((8, 4, 4), np.float32), "labels": np.zeros(8, np.int64)}
    owners = [DataOwner("owner-q1"), DataOwner("owner-q2")]  # names found nowhere else
    try:
        for owner, n in zip(owners, (300, 1000)):
            rng = np.random.default_rng(n)
            owner.upload_dataset("mnist", description="digits", mock=mock, private={
                "images": rng.random((n, 4, 4), np.float32), "labels": rng.integers(0, 10, n)})
            owner.add_data_scientist("ds@example.org", "pw")
        first, second = (guest_view(owner, "ds@example.org", "pw") for owner in owners)
        assert first == second
        fields = {key.rsplit(".", 1)[-1] for key in first}
        assert {"mb_size", "shape", "description", "syft_action_data_repr_", "syft_action_data_str_",
                "syft_action_data_type", "_repr_html_", "_repr_markdown_", "_coll_repr_"} <= fields
        assert first[".datasets[0].asset_list[0].shape"] == "(8, 4, 4)"  # the mock's, as before
    finally:
        for owner in owners:
            owner.shutdown()
