"""Seven defects of syft 0.9.5 on our path, fixed in one place. syft is abandoned upstream: we patch it here.

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
6. Server processes outlive their parent. Nothing ties an HTTP datasite's process to the process that
   started it: when a notebook's kernel is killed (out of memory, a forced restart, SIGKILL), its servers
   are re-parented to init and keep serving, holding their memory, their ports and their folders under
   the temporary directory, until somebody kills them by hand. The fix, also in :func:`run_uvicorn`: a
   watchdog thread in the server notices that the parent is gone (``os.getppid()`` changes; on Linux the
   kernel also signals it at once, through ``prctl(PR_SET_PDEATHSIG)``), stops the server the way a
   ``terminate()`` does (uvicorn's graceful shutdown, at most :data:`ORPHAN_GRACE_S` seconds, then a
   hard exit), and deletes its folder, and the syft root folder of the dead parent
   (``secure-ai-syft-<pid>``, one per process, see :mod:`secure_ai.workers`). Works with fork (Linux)
   and spawn (macOS) alike. A server stopped normally deletes its folder too: syft gives every HTTP
   server a new random id, so no later server would read it (``DataOwner.shutdown`` looks for it under
   the name's id, where only in-memory datasites keep theirs).
7. Forked servers copy the kernel's memory. On Linux a server process is forked from the kernel and
   shares its memory until either side writes a page. Two things defeated the sharing, measured with
   Part 6's three owners (PSS of kernel and servers after five rounds, PyPI's CUDA torch): 1.76 GB.
   (a) An owner's first training step makes torch import about 860 modules it loads lazily
   (``torch._dynamo``, sympy, ``torch.distributed``, ...): about 180 MB that every server loaded for
   itself. (b) The kernel's garbage collector, passing over objects the servers share with it, writes
   into every page that holds one: the servers keep their own copies. :func:`serve_server` starts each
   server after importing ``torch._dynamo`` here, where torch is loaded (once, shared by every server),
   and after freezing the collector's objects (``gc.freeze()``: it skips them until the last server
   stops, then :func:`gc.unfreeze` gives them back). 1.13 GB after, 0.10 GB private per owner instead
   of 0.30 GB. Only with the fork start method; spawned servers share nothing.

:func:`apply` is idempotent; importing :mod:`secure_ai.datasites` applies it.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import importlib
import inspect
import multiprocessing
import os
import shutil
import signal
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
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


ORPHAN_POLL_S = 0.25  # how often the watchdog looks at its parent (Linux also wakes it at once)
ORPHAN_GRACE_S = 5.0  # how long an orphaned server may take to shut down gracefully before it exits


def run_uvicorn(*args, **kwargs):
    """syft's ``run_uvicorn`` (the body of an HTTP datasite's process), after applying these fixes there,
    and stopped, with its folder deleted, when the process that started it dies (fix 6)."""
    apply()
    parent = multiprocessing.parent_process()  # the process that asked for this server (a kernel)
    parent_pid = parent.pid if parent is not None else os.getppid()
    folder = _choose_server_folder()
    orphaned = threading.Event()
    signal.signal(signal.SIGTERM, _exit_on_sigterm)  # not the default action: the cleanup below must run
    _watch_parent(parent_pid, orphaned, folder)
    try:
        return _original_run_uvicorn(*args, **kwargs)
    finally:  # the folder is this process's alone: its id is new, no later server reads it
        if orphaned.is_set():
            _remove_folders(folder, parent_pid)
        else:
            shutil.rmtree(folder, ignore_errors=True)


def _exit_on_sigterm(signum, frame):
    """SIGTERM outside uvicorn's own handler: exit through ``finally`` blocks. uvicorn re-raises the signal
    it shut down for once it is done (from ``capture_signals``): then there is nothing left to stop."""
    if frame is not None and frame.f_code.co_name == "capture_signals":
        return
    raise SystemExit(0)


def _choose_server_folder() -> Path:
    """Give this process's server a fresh random id, as syft would, but one we know, and return the folder
    syft will keep its database and blobs in (``$TMPDIR/$SYFT_TEMP_ROOT/<id>``)."""
    import syft.server.server as server_module
    from syft.server.utils import get_temp_dir_for_server
    from syft.types.uid import UID

    uid = UID()
    server_module.server_uid_env = str(uid)  # read by Server.__init__ (syft reads $SERVER_UID at import)
    return get_temp_dir_for_server(uid)


def _remove_folders(folder: Path, parent_pid: int) -> None:
    """Delete an orphaned server's folder, and its root folder when that was made for the dead parent
    (``secure-ai-syft-<parent pid>``: nobody else writes there, the other servers in it die too)."""
    shutil.rmtree(folder, ignore_errors=True)
    if folder.parent.name.endswith(f"-{parent_pid}"):
        shutil.rmtree(folder.parent, ignore_errors=True)


def _watch_parent(parent_pid: int, orphaned: threading.Event, folder: Path) -> threading.Thread:
    """Start the watchdog thread of fix 6: when the process ``parent_pid`` has ended (or this process's
    parent in the OS, the same process or a fork server it started, changed), ask the server to stop
    (SIGTERM to itself: uvicorn's graceful shutdown), and exit hard if it is not done within
    :data:`ORPHAN_GRACE_S`."""
    os_parent = os.getppid()

    def parent_alive() -> bool:
        if os.getppid() != os_parent:  # re-parented: whoever forked us has exited
            return False
        try:
            os.kill(parent_pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True

    wake = threading.Event()
    if sys.platform.startswith("linux"):  # the kernel signals the parent's death at once
        previous = signal.getsignal(signal.SIGUSR1)

        def on_parent_death(signum, frame):
            wake.set()
            if callable(previous):
                previous(signum, frame)

        signal.signal(signal.SIGUSR1, on_parent_death)
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(1, int(signal.SIGUSR1), 0, 0, 0)  # PR_SET_PDEATHSIG = 1; also sent when the parent
        # *thread* that forked us ends, so the watchdog checks the parent process before it acts

    def watch() -> None:
        while parent_alive():
            wake.wait(ORPHAN_POLL_S)
            wake.clear()
        orphaned.set()
        os.kill(os.getpid(), signal.SIGTERM)
        threading.Event().wait(ORPHAN_GRACE_S)
        _remove_folders(folder, parent_pid)  # still alive: a request that does not finish
        os._exit(1)

    thread = threading.Thread(target=watch, name="secure-ai-parent-watchdog", daemon=True)
    thread.start()
    return thread


_forked_servers = 0  # servers started by fork and not stopped yet (while > 0 the collector is frozen)


def serve_server(*args, **kwargs):
    """syft's ``serve_server``: its ``start`` forks the server once this process is ready to share its
    memory with it, and its ``stop`` unfreezes the collector after the last forked server (fix 7)."""
    start, stop = _original_serve_server(*args, **kwargs)
    server_process = inspect.getclosurevars(stop).nonlocals["server_process"]  # syft's Process
    forked = []

    def start_sharing():
        if multiprocessing.get_start_method() == "fork":
            _prepare_to_fork()
            forked.append(server_process)
        return start()

    def stop_and_thaw():
        global _forked_servers
        try:
            return stop()
        finally:
            if forked and not server_process.is_alive():
                forked.clear()
                _forked_servers -= 1
                if _forked_servers == 0:
                    gc.unfreeze()

    return start_sharing, stop_and_thaw


def _prepare_to_fork() -> None:
    global _forked_servers
    if "torch" in sys.modules:  # what torch's optimizers import on their first step
        import torch._dynamo  # noqa: F401
    gc.collect()
    gc.freeze()
    _forked_servers += 1


_original_is_execution_allowed = None
_original_attach = None
_original_has_read_permission = None
_original_execute = None
_original_run_uvicorn = None
_original_serve_server = None


def apply() -> None:
    """Install the fixes into the imported syft modules (safe to call more than once)."""
    global _applied, _original_is_execution_allowed, _original_attach, _original_has_read_permission
    global _original_execute, _original_run_uvicorn, _original_serve_server
    if _applied:
        return
    import syft.server.uvicorn as uvicorn_module
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
    _original_execute = ActionService.execute
    ActionService.execute = execute
    _original_run_uvicorn = uvicorn_module.run_uvicorn
    uvicorn_module.run_uvicorn = run_uvicorn  # serve_server looks it up at call time
    orchestra_module = importlib.import_module("syft.orchestra")  # `syft.orchestra` is also a class
    _original_serve_server = orchestra_module.serve_server
    serve_server.__wrapped__ = _original_serve_server  # orchestra reads its signature (inspect follows it)
    orchestra_module.serve_server = serve_server  # orchestra imported it by name
    _applied = True
