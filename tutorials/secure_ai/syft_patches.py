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
7. The dataset's size computed from the private data. ``DatasiteClient.upload_dataset`` sets
   ``Dataset.mb_size`` to the size of the private arrays, and every guest can list it: the exact record
   count (issue 18, leak 2: n = 257 read off ``mb_size``). The fix, in ``DatasetService.add`` on the server,
   replaces it with the size of the mocks, which any guest can download anyway.
8. Run limits raced. The run-limit check (fix 2) counts stored outputs, and a run's output is stored only
   when the run ends: calls made at once all passed the check (issue 18, leak 3: 4 DP trainings on a 1-run
   approval; 8 runs of 8 calls on 1- and 3-run approvals, in memory, forked and spawned). The fix makes
   check and count one step under one lock: a call that passes the check takes one of the approved runs
   at once, gives it back only if its run fails (a failed run stores nothing, as in syft), and turns it
   into a stored output under the same lock. syft's second execution of approved code, on the mocks,
   stores nothing and takes no run.
9. A window on the demo credential. An HTTP datasite's process creates its root account with syft's
   defaults (``info@openmined.org`` / ``changethis``), read from ``DEFAULT_ROOT_EMAIL`` /
   ``DEFAULT_ROOT_PASSWORD`` when syft is *imported*; a forked child inherits the parent's values. The
   owner changed the password after the start, and until then a demo login received the root signing key,
   which is the server's own key and survives the password change (6 s of logins accepted after the port
   opened). :func:`root_credentials` names the account to create, and :func:`run_uvicorn` installs it in
   the child before the server creates its root user: the demo credential is refused from the first moment
   the port answers.
10. HTTP calls without a timeout. ``HTTPConnection`` (syft/client/client.py) posts every API call with a
    bare ``requests.post`` and its other requests through a session, all without a timeout: a datasite
    that accepts the connection and never answers (a frozen or cut-off machine) blocks the call forever.
    The fix gives every request ``(CONNECT_TIMEOUT_S, read timeout)``: ``READ_TIMEOUT_S`` by default
    (300 s, longer than any approved call of the series; the environment variable
    ``SECURE_AI_HTTP_TIMEOUT`` overrides it), or what :func:`set_http_timeout` chose for that client.
    Retries stay as syft has them (none for API calls; three with back-off for its session's requests after
    a refused connection), except that a timeout is never retried: it would multiply the wait.

:func:`apply` is idempotent; importing :mod:`secure_ai.datasites` applies it.
"""
from __future__ import annotations

import os
import threading
from collections import Counter
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import requests

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


_runs_lock = threading.Lock()  # fix 8: the run-limit check and the count happen under it
_running = Counter()  # user code id -> runs that passed the check and have stored no output yet
_this_call = threading.local()  # .code_id: the user code whose run this thread's call has started


def is_execution_allowed(self, code, context, output_policy):
    """syft's check, plus fix 2 (a used-up policy refuses) and fix 8 (check and count in one step)."""
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
                                    "up or running now (secure_ai fix 8)")
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
    """syft's ``dataset.add``, with ``mb_size`` the size of the mocks instead of the private data (fix 7)."""
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
    """syft's ``run_uvicorn`` (the body of an HTTP datasite's process), after applying these fixes there."""
    apply()
    _install_root_credentials()  # fix 9
    return _original_run_uvicorn(*args, **kwargs)


_ROOT_ENV = ("DEFAULT_ROOT_EMAIL", "DEFAULT_ROOT_PASSWORD")  # what syft reads (syft/server/env.py)
_root_lock = threading.Lock()


@contextmanager
def root_credentials(email: str, password: str):
    """HTTP datasites started inside this block create their root account as ``email`` / ``password``.

    The environment carries them to the server's process, forked or spawned (fix 9); it is restored after
    the block, so the servers started later, and in-memory datasites, are not affected.
    """
    with _root_lock:
        saved = {key: os.environ.get(key) for key in _ROOT_ENV}
        os.environ.update(dict(zip(_ROOT_ENV, (email, password))))
        try:
            yield
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def _install_root_credentials() -> None:
    """In a server's process: the root account syft creates is the one the environment names (fix 9).

    ``Server.__init__`` took syft's defaults as keyword defaults when syft was imported (in the parent,
    for a forked child). The variables leave the environment, where approved code could read them.
    """
    from syft.server.server import Server

    email, password = (os.environ.pop(key, None) for key in _ROOT_ENV)
    if email and password:
        Server.__init__.__kwdefaults__.update(root_email=email, root_password=password)


CONNECT_TIMEOUT_S = 10.0  # fix 10: seconds to open a connection, and to wait for an answer
READ_TIMEOUT_S = float(os.environ.get("SECURE_AI_HTTP_TIMEOUT", "300"))


def set_http_timeout(client, read_s: float | None) -> None:
    """Wait at most ``read_s`` seconds for each answer of ``client``'s datasite (``None``: the default,
    :data:`READ_TIMEOUT_S`). A datasite that does not answer in time fails the call. No effect on an
    in-memory datasite, whose calls never wait on a network."""
    if read_s is not None and not (isinstance(read_s, int | float) and read_s > 0):
        raise ValueError(f"the HTTP timeout must be a positive number of seconds or None, got {read_s!r}")
    connection = getattr(client, "connection", None)
    if hasattr(connection, "session_cache"):  # an HTTPConnection
        connection.session.secure_ai_read_timeout = read_s


def http_timeout(connection) -> tuple[float, float]:
    """``(connect, read)`` seconds for a request of ``connection`` (an ``HTTPConnection``)."""
    read = getattr(connection.session, "secure_ai_read_timeout", None)
    return CONNECT_TIMEOUT_S, READ_TIMEOUT_S if read is None else read


class TimeoutAdapter(requests.adapters.HTTPAdapter):
    """The adapter of syft's HTTP session: syft's retries, and a timeout on every request (fix 10)."""

    def __init__(self, connection, **kwargs):
        super().__init__(**kwargs)
        self.connection = connection

    def send(self, request, timeout=None, **kwargs):
        return super().send(request, timeout=timeout or http_timeout(self.connection), **kwargs)


def session(self) -> requests.Session:
    """syft's ``HTTPConnection.session`` (its GET, PUT and login requests), with :class:`TimeoutAdapter`."""
    from urllib3.util.retry import Retry

    if self.session_cache is None:
        new = requests.Session()
        # syft's retries (a refused connection: 3 more tries, 0 + 1 + 2 s apart), but none after a read
        # timeout: the server has the request, and a frozen one would cost 4 timeouts and 3 s
        adapter = TimeoutAdapter(self, max_retries=Retry(total=3, read=False, backoff_factor=0.5))
        new.mount("http://", adapter)
        new.mount("https://", adapter)
        self.session_cache = new
    return self.session_cache


def make_call(self, signed_call):
    """syft's ``HTTPConnection.make_call`` (every API call): one POST, now with a timeout (fix 10)."""
    from syft.serde.deserialize import _deserialize
    from syft.serde.serialize import _serialize

    if self.rtunnel_token:  # calls through a reverse tunnel (never made here): syft's own code
        return _original_make_call(self, signed_call)
    response = requests.post(str(self.api_url), data=_serialize(signed_call, to_bytes=True),
                             headers=self.headers, timeout=http_timeout(self))
    if response.status_code != 200:
        raise requests.ConnectionError(f"{self.api_url} answered with HTTP code {response.status_code}")
    return _deserialize(response.content, from_bytes=True)


_original_is_execution_allowed = None
_original_attach = None
_original_has_read_permission = None
_original_execute = None
_original_run_uvicorn = None
_original_add_dataset = None
_original_call = None
_original_store = None
_original_make_call = None


def apply() -> None:
    """Install the fixes into the imported syft modules (safe to call more than once)."""
    global _applied, _original_is_execution_allowed, _original_attach, _original_has_read_permission
    global _original_execute, _original_run_uvicorn, _original_add_dataset, _original_call, _original_store
    global _original_make_call
    if _applied:
        return
    import syft.server.uvicorn as uvicorn_module
    import syft.service.service as service_module
    import syft.types.syft_object as syft_object_module
    from syft.client.client import HTTPConnection
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
    _original_make_call, HTTPConnection.make_call = HTTPConnection.make_call, make_call
    HTTPConnection.session = property(session)
    _applied = True
