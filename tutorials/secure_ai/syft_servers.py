"""HTTP datasites as processes, and syft's client that reaches them: its defects there, fixed.

These are fixes 6, 7, 10 and 11 of :mod:`secure_ai.syft_patches`, which lists every fix and applies these
with the others. Its ``run_uvicorn`` (fix 5: the body of an HTTP datasite's process) calls
:func:`watch_parent`, :func:`choose_server_folder` and :func:`install_root_credentials` in the server's
process; :func:`install` replaces syft's ``serve_server`` and its HTTP client's requests.

6. Server processes outlive their parent. Nothing ties an HTTP datasite's process to the process that
   started it: when a notebook's kernel is killed (out of memory, a forced restart, SIGKILL), its servers
   are re-parented to init and keep serving, holding their memory, their ports and their folders under
   the temporary directory, until somebody kills them by hand. The fix, in the server's process
   (:func:`watch_parent`, started by ``run_uvicorn``): a watchdog thread notices that the parent is gone
   (``os.getppid()`` changes; on Linux the kernel also signals it at once, through
   ``prctl(PR_SET_PDEATHSIG)``), stops the server the way a ``terminate()`` does (uvicorn's graceful
   shutdown, at most :data:`ORPHAN_GRACE_S` seconds, then a hard exit), and deletes its folder, and the
   syft root folder of the dead parent (``secure-ai-syft-<pid>``, one per process, see
   :mod:`secure_ai.datasites`). Works with fork (Linux) and spawn (macOS) alike. A server stopped normally
   deletes its folder too: syft gives every HTTP server a new random id, so no later server would read it
   (``DataOwner.shutdown`` looks for it under the name's id, where only in-memory datasites keep theirs).
7. Forked servers copy the kernel's memory. On Linux a server process is forked from the kernel and
   shares its memory until either side writes a page. Two things defeated the sharing, measured with
   Part 7's three owners (PSS of kernel and servers after five rounds, PyPI's CUDA torch): 1.76 GB.
   (a) An owner's first training step makes torch import about 860 modules it loads lazily
   (``torch._dynamo``, sympy, ``torch.distributed``, ...): about 180 MB that every server loaded for
   itself. (b) The kernel's garbage collector, passing over objects the servers share with it, writes
   into every page that holds one: the servers keep their own copies. :func:`serve_server` starts each
   server after importing ``torch._dynamo`` here, where torch is loaded (once, shared by every server),
   and after freezing the collector's objects (``gc.freeze()``: it skips them until the last server
   stops, then :func:`gc.unfreeze` gives them back). 1.13 GB after, 0.10 GB private per owner instead
   of 0.30 GB. Only with the fork start method; spawned servers share nothing.
10. A window on the demo credential. An HTTP datasite's process creates its root account with syft's
    defaults (``info@openmined.org`` / ``changethis``), read from ``DEFAULT_ROOT_EMAIL`` /
    ``DEFAULT_ROOT_PASSWORD`` when syft is *imported*; a forked child inherits the parent's values. The
    owner changed the password after the start, and until then a demo login received the root signing key,
    which is the server's own key and survives the password change (6 s of logins accepted after the port
    opened). :func:`root_credentials` names the account to create, and ``run_uvicorn`` installs it in the
    child (:func:`install_root_credentials`) before the server creates its root user: the demo credential is
    refused from the first moment the port answers.
11. HTTP calls without a timeout. ``HTTPConnection`` (syft/client/client.py) posts every API call with a
    bare ``requests.post`` and its other requests through a session, all without a timeout: a datasite
    that accepts the connection and never answers (a frozen or cut-off machine) blocks the call forever.
    The fix gives every request ``(CONNECT_TIMEOUT_S, read timeout)``: ``READ_TIMEOUT_S`` by default
    (300 s, longer than any approved call of the series; the environment variable
    ``SECURE_AI_HTTP_TIMEOUT`` overrides it), or what :func:`set_http_timeout` chose for that client.
    Retries stay as syft has them (none for API calls; three with back-off for its session's requests after
    a refused connection), except that a timeout is never retried: it would multiply the wait.
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
from contextlib import contextmanager
from pathlib import Path

import requests

ORPHAN_POLL_S = 0.25  # how often the watchdog looks at its parent (Linux also wakes it at once)
ORPHAN_GRACE_S = 5.0  # how long an orphaned server may take to shut down gracefully before it exits


def exit_on_sigterm(signum, frame):
    """SIGTERM outside uvicorn's own handler: exit through ``finally`` blocks. uvicorn re-raises the signal
    it shut down for once it is done (from ``capture_signals``): then there is nothing left to stop."""
    if frame is not None and frame.f_code.co_name == "capture_signals":
        return
    raise SystemExit(0)


def choose_server_folder() -> Path:
    """Give this process's server a fresh random id, as syft would, but one we know, and return the folder
    syft will keep its database and blobs in (``$TMPDIR/$SYFT_TEMP_ROOT/<id>``)."""
    import syft.server.server as server_module
    from syft.server.utils import get_temp_dir_for_server
    from syft.types.uid import UID

    uid = UID()
    server_module.server_uid_env = str(uid)  # read by Server.__init__ (syft reads $SERVER_UID at import)
    return get_temp_dir_for_server(uid)


def remove_folders(folder: Path, parent_pid: int) -> None:
    """Delete an orphaned server's folder, and its root folder when that was made for the dead parent
    (``secure-ai-syft-<parent pid>``: nobody else writes there, the other servers in it die too)."""
    shutil.rmtree(folder, ignore_errors=True)
    if folder.parent.name.endswith(f"-{parent_pid}"):
        shutil.rmtree(folder.parent, ignore_errors=True)


def watch_parent(parent_pid: int, orphaned: threading.Event, folder: Path) -> threading.Thread:
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
        remove_folders(folder, parent_pid)  # still alive: a request that does not finish
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


_ROOT_ENV = ("DEFAULT_ROOT_EMAIL", "DEFAULT_ROOT_PASSWORD")  # what syft reads (syft/server/env.py)
_root_lock = threading.Lock()


@contextmanager
def root_credentials(email: str, password: str):
    """HTTP datasites started inside this block create their root account as ``email`` / ``password``.

    The environment carries them to the server's process, forked or spawned (fix 10); it is restored after
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


def install_root_credentials() -> None:
    """In a server's process: the root account syft creates is the one the environment names (fix 10).

    ``Server.__init__`` took syft's defaults as keyword defaults when syft was imported (in the parent,
    for a forked child). The variables leave the environment, where approved code could read them.
    """
    from syft.server.server import Server

    email, password = (os.environ.pop(key, None) for key in _ROOT_ENV)
    if email and password:
        Server.__init__.__kwdefaults__.update(root_email=email, root_password=password)


CONNECT_TIMEOUT_S = 10.0  # fix 11: seconds to open a connection, and to wait for an answer
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
    """The adapter of syft's HTTP session: syft's retries, and a timeout on every request (fix 11)."""

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
    """syft's ``HTTPConnection.make_call`` (every API call): one POST, now with a timeout (fix 11)."""
    from syft.serde.deserialize import _deserialize
    from syft.serde.serialize import _serialize

    if self.rtunnel_token:  # calls through a reverse tunnel (never made here): syft's own code
        return _original_make_call(self, signed_call)
    response = requests.post(str(self.api_url), data=_serialize(signed_call, to_bytes=True),
                             headers=self.headers, timeout=http_timeout(self))
    if response.status_code != 200:
        raise requests.ConnectionError(f"{self.api_url} answered with HTTP code {response.status_code}")
    return _deserialize(response.content, from_bytes=True)


_original_serve_server = None
_original_make_call = None


def install() -> None:
    """Replace syft's ``serve_server`` (fix 7) and its HTTP client's requests (fix 11); called once by
    :func:`secure_ai.syft_patches.apply`."""
    global _original_serve_server, _original_make_call
    from syft.client.client import HTTPConnection

    orchestra_module = importlib.import_module("syft.orchestra")  # `syft.orchestra` is also a class
    _original_serve_server = orchestra_module.serve_server
    serve_server.__wrapped__ = _original_serve_server  # orchestra reads its signature (inspect follows it)
    orchestra_module.serve_server = serve_server  # orchestra imported it by name
    _original_make_call, HTTPConnection.make_call = HTTPConnection.make_call, make_call
    HTTPConnection.session = property(session)
