"""The defects of syft 0.9.5 on our path, fixed in one place. syft is abandoned upstream: we patch it here.

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
   cannot read the result even of its own objects. The fix applies the same rule input by input
   (``self``, positional and keyword arguments).
4. Pointer operations and Plans are guarded only on the client. The owner's setting
   ``eager_execution_enabled`` ("pointer operations on") is read by the *client* to decide whether to send
   an operation; the server's ``action.execute`` runs whatever a guest sends. And a Plan call runs a list
   of inner actions whose inputs are not the outer action's inputs, so the read rule of fix 3 sees only
   the outer ones. The fix, in ``ActionService.execute``: a user below the data-owner role may run
   operations on pointers only when the owner switched them on, and nobody may call a Plan (this series
   never uses them).
5. Fixes lost in server processes. An HTTP datasite runs in a child process (``serve_server`` starts
   ``run_uvicorn``). On Linux the child is forked and inherits the patched modules; syft itself switches
   to the *spawn* start method on macOS, and a spawned child imports stock syft, with fixes 1-4 absent.
   The fix replaces ``syft.server.uvicorn.run_uvicorn`` with :func:`run_uvicorn`, which applies the fixes
   in the child before it serves.
6, 7. Server processes outlive their parent; forked servers copy the kernel's memory: see
   :mod:`secure_ai.syft_servers`, which holds the fixes of HTTP datasites as processes.
8. The dataset's size computed from the private data. ``DatasiteClient.upload_dataset`` sets
   ``Dataset.mb_size`` to the size of the private arrays, and every guest can list it: the exact record
   count (issue 18, leak 2: n = 257 read off ``mb_size``). The fix, in ``DatasetService.add`` on the server,
   replaces it with the size of the mocks, which any guest can download anyway.
9. Run limits raced. The run-limit check (fix 2) counts stored outputs, and a run's output is stored only
   when the run ends: calls made at once all passed the check (issue 18, leak 3: 4 DP trainings on a 1-run
   approval; 8 runs of 8 calls on 1- and 3-run approvals, in memory, forked and spawned). The fix makes
   check and count one step under one lock: a call that passes the check takes one of the approved runs
   at once, gives it back only if its run fails (a failed run stores nothing, as in syft), and turns it
   into a stored output under the same lock. syft's second execution of approved code, on the mocks,
   stores nothing and takes no run.
10, 11. A window on the demo credential; HTTP calls without a timeout: in :mod:`secure_ai.syft_servers`.

:func:`apply` is idempotent; importing :mod:`secure_ai.datasites` applies it.
"""
from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
import threading
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from . import syft_servers

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


_runs_lock = threading.Lock()  # fix 9: the run-limit check and the count happen under it
_running = Counter()  # user code id -> runs that passed the check and have stored no output yet
_this_call = threading.local()  # .code_id: the user code whose run this thread's call has started


def is_execution_allowed(self, code, context, output_policy):
    """syft's check, plus fix 2 (a used-up policy refuses) and fix 9 (check and count in one step)."""
    from syft.service.code.user_code_service import IsExecutionAllowedEnum
    from syft.types.errors import SyftException

    allowed = _original_is_execution_allowed(self, code, context, output_policy)
    if allowed is not IsExecutionAllowedEnum.ALLOWED or output_policy is None:
        return allowed
    with _runs_lock:
        if not output_policy.is_valid(context):
            return IsExecutionAllowedEnum.INVALID_OUTPUT_POLICY  # used up: syft may answer from its cache
        limit = getattr(output_policy, "limit", None)
        if limit is not None and hasattr(output_policy, "count"):  # OutputPolicyExecuteCount and Once
            if output_policy.count(context) + _running[code.id] >= limit:
                raise SyftException(public_message=f"Execution denied: the approved runs ({limit}) are used "
                                    "up or running now (secure_ai fix 9)")
            _running[code.id] += 1
            _this_call.code_id = code.id
    return allowed


def call_user_code(self, context, *args, **kwargs):
    """syft's ``UserCodeService._call``; a run that started and stored no output gives its place back."""
    outer, _this_call.code_id = getattr(_this_call, "code_id", None), None
    try:
        return _original_call(self, context, *args, **kwargs)
    finally:
        with _runs_lock:
            _end_run()
        _this_call.code_id = outer


def store_execution_output(self, context, *args, **kwargs):
    """syft's ``UserCode.store_execution_output``: a started run becomes a stored output in one step."""
    with _runs_lock:
        result = _original_store(self, context, *args, **kwargs)
        if getattr(_this_call, "code_id", None) == self.id and result.is_ok():
            _end_run()
    return result


def _end_run() -> None:
    """This thread's started run leaves the running ones (call it holding ``_runs_lock``)."""
    code_id, _this_call.code_id = _this_call.code_id, None
    if code_id is not None:
        _running[code_id] -= 1
        if _running[code_id] <= 0:
            del _running[code_id]


def add_dataset(self, context, *args, **kwargs):
    """syft's ``dataset.add``, with ``mb_size`` the size of the mocks instead of the private data (fix 8)."""
    from syft.util.util import get_mb_size

    dataset = kwargs["dataset"] if "dataset" in kwargs else args[0]
    dataset.mb_size = sum(get_mb_size(asset.mock) for asset in dataset.asset_list)
    return _original_add_dataset(self, context, *args, **kwargs)


def has_read_permission_for_action_result(self, context, action) -> bool:
    """syft's rule (READ on every input of the action), checked input by input."""
    from syft.service.action.action_permissions import ActionObjectREAD

    inputs = [*action.args, *action.kwargs.values(), action.remote_self]
    return all(
        self.stash.has_permission(ActionObjectREAD(uid=uid, credentials=context.credentials))
        for uid in inputs
        if uid is not None
    )


def execute(self, context, *args, **kwargs):
    """syft's ``action.execute``; refuses Plan calls, and pointer operations the owner did not switch on."""
    from syft.service.action.action_object import ActionType, TwinMode
    from syft.service.action.plan import Plan
    from syft.service.user.user_roles import ServiceRole
    from syft.types.errors import SyftException

    action = args[0] if args else kwargs["action"]
    if action.op == "__call__" and action.remote_self is not None:
        target = self._get(context, uid=action.remote_self, twin_mode=TwinMode.NONE, has_permission=True)
        if target.is_ok() and target.ok().syft_action_data_type == Plan:
            raise SyftException(public_message="Plan calls are refused on this datasite (secure_ai patch 4)")
    is_operation = action.action_type not in (ActionType.CREATEOBJECT, ActionType.SYFTFUNCTION)
    if is_operation and context.role.value < ServiceRole.DATA_OWNER.value:
        if not context.server.settings.eager_execution_enabled:
            raise SyftException(
                public_message="operations on pointers are switched off on this datasite; the owner "
                "must enable them (secure_ai.pointers.enable_pointer_ops)"
            )
    return _original_execute(self, context, *args, **kwargs)


def run_uvicorn(*args, **kwargs):
    """syft's ``run_uvicorn`` (the body of an HTTP datasite's process), after applying these fixes there
    (fix 5); its root account is the owner's, never the demo one (fix 10); and it stops, with its folder
    deleted, when the process that started it dies (fix 6)."""
    apply()
    syft_servers.install_root_credentials()
    parent = multiprocessing.parent_process()  # the process that asked for this server (a kernel)
    parent_pid = parent.pid if parent is not None else os.getppid()
    folder = syft_servers.choose_server_folder()
    orphaned = threading.Event()
    signal.signal(signal.SIGTERM, syft_servers.exit_on_sigterm)  # not the default action: cleanup below
    syft_servers.watch_parent(parent_pid, orphaned, folder)
    try:
        return _original_run_uvicorn(*args, **kwargs)
    finally:  # the folder is this process's alone: its id is new, no later server reads it
        if orphaned.is_set():
            syft_servers.remove_folders(folder, parent_pid)
        else:
            shutil.rmtree(folder, ignore_errors=True)


_original_is_execution_allowed = None
_original_attach = None
_original_has_read_permission = None
_original_execute = None
_original_run_uvicorn = None
_original_add_dataset = None
_original_call = None
_original_store = None


def apply() -> None:
    """Install the fixes into the imported syft modules (safe to call more than once)."""
    global _applied, _original_is_execution_allowed, _original_attach, _original_has_read_permission
    global _original_execute, _original_run_uvicorn, _original_add_dataset, _original_call, _original_store
    if _applied:
        return
    import syft.server.uvicorn as uvicorn_module
    import syft.service.service as service_module
    import syft.types.syft_object as syft_object_module
    from syft.service.action.action_service import ActionService
    from syft.service.code.user_code import UserCode
    from syft.service.code.user_code_service import UserCodeService
    from syft.service.dataset.dataset_service import DatasetService

    _original_attach = syft_object_module.attach_attribute_to_syft_object
    syft_object_module.attach_attribute_to_syft_object = attach_attribute_to_syft_object
    service_module.attach_attribute_to_syft_object = attach_attribute_to_syft_object
    _original_is_execution_allowed = UserCodeService.is_execution_allowed
    UserCodeService.is_execution_allowed = is_execution_allowed
    _original_has_read_permission = ActionService.has_read_permission_for_action_result
    ActionService.has_read_permission_for_action_result = has_read_permission_for_action_result
    _original_execute = ActionService.execute
    ActionService.execute = execute
    _original_run_uvicorn = uvicorn_module.run_uvicorn
    uvicorn_module.run_uvicorn = run_uvicorn  # serve_server looks it up at call time
    _original_add_dataset, DatasetService.add = DatasetService.add, add_dataset
    _original_call, UserCodeService._call = UserCodeService._call, call_user_code
    _original_store, UserCode.store_execution_output = UserCode.store_execution_output, store_execution_output
    syft_servers.install()
    _applied = True
