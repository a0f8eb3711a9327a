"""secure_ai.syft_patches: the fixes are installed and hold against a data scientist who cheats.

The end-to-end proof that run limits hold in this process is in test_datasites.py
(test_approved_request_runs_at_most_the_approved_number_of_times); here, in a spawned server process.
"""
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


# --- fix 6: a server dies with the process that started it -------------------------------------------------
ORPHAN_SCRIPT = r"""
import json, multiprocessing, os, sys, threading, time
if sys.argv[1] == "spawn":
    multiprocessing.set_start_method("spawn", force=True)   # syft's choice on macOS
import psutil
from secure_ai.datasites import TEMP_ROOT, DataOwner, port_is_free

owners = []
starter = threading.Thread(target=lambda: owners.append(DataOwner("orphan", port=int(sys.argv[2]))))
starter.start()
starter.join()                  # the thread that forked the server is gone: Linux sends PR_SET_PDEATHSIG now
time.sleep(2 * float(sys.argv[3]))
port = int(sys.argv[2])
server = next(child for child in psutil.Process().children()
              if any(c.laddr.port == port and c.status == "LISTEN" for c in child.net_connections()))
assert server.is_running() and not port_is_free(port), "the server died with its parent thread"
folders = [str(path) for path in TEMP_ROOT.iterdir()]   # the one server's database and blobs
print(json.dumps({"pid": server.pid, "folders": folders, "root": str(TEMP_ROOT)}), flush=True)
time.sleep(600)
"""


def _gone(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_a_server_dies_with_the_process_that_started_it(start_method, tmp_path):
    """Fix 6: SIGKILL the process that started an HTTP owner (as the OOM killer does to a kernel); within
    seconds its server has exited, its port is free and its folder and the process's syft root are gone.

    Measured before this fix: the server was re-parented to init and kept serving (0.9 GB RSS each in
    Part 6), and its folder stayed in the temporary directory."""
    import json
    import os
    import shutil
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from secure_ai import datasites

    port = datasites.free_port()
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "tutorials"))
    env.pop("SYFT_TEMP_ROOT", None)  # inherited from this process: the starter must make its own
    starter = subprocess.Popen(
        [sys.executable, "-c", ORPHAN_SCRIPT, start_method, str(port), str(syft_patches.ORPHAN_POLL_S)],
        stdout=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    try:
        lines = iter(starter.stdout.readline, "")  # a spawned server prints to the same stdout
        line = next((line for line in lines if line.startswith("{")), None)
        assert line, f"the starter failed (exit {starter.wait(timeout=30)})"
        started = json.loads(line)
        assert len(started["folders"]) == 1 and Path(started["folders"][0]).is_dir()
        assert not datasites.port_is_free(port)
        os.kill(starter.pid, signal.SIGKILL)
        starter.wait(timeout=10)
        deadline = time.monotonic() + syft_patches.ORPHAN_GRACE_S + 10
        while time.monotonic() < deadline and not (_gone(started["pid"]) and datasites.port_is_free(port)):
            time.sleep(0.2)
    finally:
        starter.kill()
    survived = not _gone(started["pid"])
    if survived:  # do not leave it running for the next tests
        os.kill(started["pid"], signal.SIGKILL)
        shutil.rmtree(started["root"], ignore_errors=True)
    assert not survived, "the server outlived the process that started it"
    assert datasites.port_is_free(port)
    assert not Path(started["folders"][0]).exists() and not Path(started["root"]).exists()


# --- fix 7: a forked server shares the kernel's memory ---------------------------------------------------
def _private_bytes(pid: int) -> int:
    """Memory only this process holds (USS): its pages that no other process maps."""
    fields = {}
    with open(f"/proc/{pid}/smaps_rollup") as handle:
        for line in handle:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                fields[parts[0]] = int(parts[1]) * 1024
    return fields["Private_Clean:"] + fields["Private_Dirty:"]


def test_a_forked_server_trains_without_loading_torch_again():
    """Fix 7: after its first training call, an owner's forked server holds about 0.1 GB of its own, not
    0.3 GB (it no longer imports torch's ~860 lazily loaded modules itself, and this process's collector
    leaves the objects they share alone while it runs); the collector is unfrozen after it stops."""
    import gc
    import multiprocessing
    import os
    import sys

    from secure_ai import datasites, scale
    from secure_ai import federated as fl
    from secure_ai import training as tr
    from secure_ai.datasites import DataOwner

    if multiprocessing.get_start_method() != "fork" or not os.path.exists("/proc/self/smaps_rollup"):
        pytest.skip("servers are forked, and private memory read from /proc, on Linux only")
    from secure_ai.datasites import TEMP_ROOT

    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (256, 28, 28), dtype=np.uint8), rng.integers(0, 10, 256)
    before = set(TEMP_ROOT.iterdir()) if TEMP_ROOT.exists() else set()
    owner = DataOwner("fix7", port=datasites.free_port())
    try:
        assert "torch._dynamo" in sys.modules and gc.get_freeze_count() > 0
        fl.upload_mnist(owner, images, labels, mock_size=8)
        owner.add_data_scientist("ds@example.org", "pw")
        client = owner.login("ds@example.org", "pw")
        fl.request_training(client, scale.train_local_epoch, rounds=2)
        owner.code_of("train_local_epoch")
        owner.approve("train_local_epoch")
        train = scale.remote_trainer(client, "train_local_epoch", max_samples=256)
        reply = train({"model": "mlp", "lr": 0.05, "momentum": 0.5, "batch_size": 32, "seed": 0,
                       "vector": tr.model_to_vector(tr.MLP()).numpy()})
        assert reply["n_samples"] == 256
        private = _private_bytes(datasites.server_process(owner).pid)
        assert private < 170e6, f"the server holds {private / 1e6:.0f} MB of its own (0.3 GB before fix 7)"
        folders = set(TEMP_ROOT.iterdir()) - before
        assert len(folders) == 1, folders  # the server's database and blobs
    finally:
        owner.shutdown()
    assert gc.get_freeze_count() == 0 or syft_patches._forked_servers > 0
    assert not any(folder.exists() for folder in folders), "fix 6: a stopped server deletes its folder"
