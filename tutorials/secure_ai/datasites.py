"""The data owner's side of syft 0.9.5: datasites, the review and approval of code, and server processes.

A :class:`DataOwner` starts a named datasite (in memory by default, or an HTTP server on 127.0.0.1),
holds private data next to a mock, lets a data scientist register, and reviews their code requests: every
approval, federated DP-SGD's included, goes through :meth:`DataOwner.approve`, bound to the reviewed code
(what a review shows and binds is :class:`secure_ai.review.CodeReview`).
Everything a data owner does goes through syft's own API; this module only removes the boilerplate and the
noise, and makes restarts clean: starting an owner whose name is already running replaces it, and
:func:`shutdown_all` (also run at exit) leaves no servers, ports or temporary folders behind.

An HTTP owner's server is a process of its own: :func:`server_process`, :func:`memory_mb`, and real failures
for the lessons and tests, :func:`kill_owner` (SIGKILL) and :func:`pause_owner` / :func:`resume_owner`
(SIGSTOP/SIGCONT, a straggler). :func:`free_port` asks the OS for a free port: never hard-code ports.

This is the syft gateway: importing it imports syft quietly, applies :mod:`secure_ai.syft_patches` and
registers :func:`shutdown_all` at exit. Import syft through it (``sy``), and never from code that runs on a
datasite. The data scientist's side is :mod:`secure_ai.remote`.
"""
from __future__ import annotations

import atexit
import gc
import multiprocessing
import os
import re
import secrets
import shutil
import signal
import socket
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import psutil

from . import syft_patches, syft_servers
from .quiet import quiet, silence_logging
from .review import CodeReview
from .runtime import release_memory

# syft keeps each datasite's database and blobs under $TMPDIR/$SYFT_TEMP_ROOT/<server id>. One folder per
# Python process, so that two notebooks (or a notebook and the tests) never share a datasite's files.
# A spawned server process inherits the variable, and with it the folder: only the process that named the
# folder removes it at exit (an owner's server that imported this module must not delete its kernel's folder).
_NAMED_ROOT = "SYFT_TEMP_ROOT" not in os.environ
os.environ.setdefault("SYFT_TEMP_ROOT", f"secure-ai-syft-{os.getpid()}")
TEMP_ROOT = Path(tempfile.gettempdir(), os.environ["SYFT_TEMP_ROOT"])

with quiet():
    import syft as sy
syft_patches.apply()
silence_logging()

# syft 0.9.5's default admin account, a well-known demo credential. An in-memory datasite keeps it: only
# this process can reach it, and this process holds the owner's client anyway. An HTTP datasite is created
# with a fresh random password instead (syft_patches fix 9): the demo password never works there.
ADMIN_EMAIL, ADMIN_PASSWORD = "info@openmined.org", "changethis"
_EVERY_INTERFACE = ("0.0.0.0", "::", "")  # hosts that mean "listen on every network interface"

_running: dict[str, DataOwner] = {}
_paused: set[int] = set()  # pids of servers this process stopped with SIGSTOP and has not resumed


def running_owners() -> list[str]:
    """Names of the data owners started in this process and not yet shut down."""
    return list(_running)


def get_owner(name: str) -> DataOwner:
    """The running data owner called ``name``; a clear error for an unknown name."""
    if name not in _running:
        known = ", ".join(sorted(_running)) or "none"
        raise ValueError(f"unknown data owner {name!r}; running owners: {known}")
    return _running[name]


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """True when nothing listens on ``host:port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        return sock.connect_ex((host, port)) != 0


class DataOwner:
    """A data owner (e.g. ``DataOwner("joe")``) running a syft datasite on their own machine.

    ``port=None`` runs the datasite inside this Python process (fast, nothing to clean up); with a port it
    is a real HTTP server on ``host`` (127.0.0.1 unless you ask otherwise) in a separate process, reachable
    at :attr:`url`. An HTTP datasite's admin account has a fresh random password (:attr:`admin_password`)
    from its first moment: syft's demo credential is never accepted there.
    """

    def __init__(self, name: str, port: int | None = None, host: str = "127.0.0.1"):
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]{0,39}", name):
            raise ValueError(
                f"owner name must be a short word of letters, digits, '-' or '_', got {name!r}"
            )
        if port is not None:
            if not isinstance(port, int) or not 1024 <= port <= 65535:
                raise ValueError(f"port must be an int between 1024 and 65535, got {port!r}")
        if name in _running:  # re-running a notebook: replace the old datasite
            _running[name].shutdown()
        if port is not None and not port_is_free(port):
            raise ValueError(f"port {port} is already in use; pick another or shut that server down")
        self.name, self.port, self.host = name, port, host
        self.admin_password = ADMIN_PASSWORD if port is None else secrets.token_urlsafe(24)
        self._reviews: dict[str, CodeReview] = {}
        self._process = None  # the HTTP server's multiprocessing.Process (see server_process)
        with quiet():
            if port is None:
                self._handle = sy.orchestra.launch(name=name, reset=True)
            else:  # the server process starts through syft_patches.run_uvicorn, so it runs with our fixes
                before = set(multiprocessing.active_children())
                with syft_servers.root_credentials(ADMIN_EMAIL, self.admin_password):
                    self._handle = sy.orchestra.launch(name=name, reset=True, port=port, host=host)
                started = [p for p in multiprocessing.active_children() if p not in before]
                self._process = started[0] if len(started) == 1 else None
            self.client = self._handle.login(email=ADMIN_EMAIL, password=self.admin_password)
        _running[name] = self

    def __repr__(self) -> str:
        where = self.url or "in memory"
        state = "running" if self.is_running else "shut down"
        return f"DataOwner({self.name!r}, {where}, {state})"

    @property
    def url(self) -> str | None:
        """Where a data scientist connects: ``http://<host>:<port>``, ``None`` for an in-memory datasite.

        A datasite on ``host="0.0.0.0"`` listens on every interface, and 0.0.0.0 is no address to connect
        to: the url then names this machine (``socket.gethostname()``). Another machine reaches it only if
        its network resolves that name; if not, give the data scientist this machine's IP address.
        """
        if self.port is None:
            return None
        host = socket.gethostname() if self.host in _EVERY_INTERFACE else self.host
        return f"http://{host}:{self.port}"

    @property
    def is_running(self) -> bool:
        return _running.get(self.name) is self

    def check_running(self) -> None:
        """``RuntimeError`` unless this owner is still running (a shut-down or replaced one does nothing)."""
        if not self.is_running:
            raise RuntimeError(f"data owner {self.name!r} has been shut down; start a new DataOwner")

    # --- data -----------------------------------------------------------------------------------------
    def upload_dataset(
        self,
        name: str,
        private: Mapping[str, np.ndarray],
        mock: Mapping[str, np.ndarray],
        description: str = "",
    ):
        """Put a dataset on the datasite: one asset per key, each with its private data and a mock.

        The mock is what a data scientist may look at and test code on: same dtype and the same shape
        per sample as the private data (it may hold fewer samples).
        """
        self.check_running()
        if set(private) != set(mock) or not private:
            raise ValueError(
                f"private and mock must have the same asset names, got {sorted(private)} and {sorted(mock)}"
            )
        for key in private:
            real, fake = np.asarray(private[key]), np.asarray(mock[key])
            if real.dtype != fake.dtype or real.shape[1:] != fake.shape[1:]:
                raise ValueError(
                    f"mock of asset {key!r} must match the private data's dtype and per-sample shape: "
                    f"private {real.dtype}{real.shape}, mock {fake.dtype}{fake.shape}"
                )
        if name in [d.name for d in self.client.datasets]:  # checked before any private data is stored
            raise ValueError(f"{self.name} already holds a dataset named {name!r}; pick another name")
        dataset = sy.Dataset(name=name, description=description or f"{name}, held by {self.name}")
        for key in private:
            dataset.add_asset(sy.Asset(name=key, data=np.asarray(private[key]), mock=np.asarray(mock[key])))
        with quiet():
            self.client.upload_dataset(dataset)
        return self.client.datasets[name]

    # --- people ---------------------------------------------------------------------------------------
    def add_data_scientist(self, email: str, password: str, name: str = "Data Scientist") -> None:
        """Create an account with syft's DATA_SCIENTIST role: it sees mocks and asks before running code."""
        self.check_running()
        if "@" not in email or not password:
            raise ValueError("a data scientist needs an email address and a non-empty password")
        from syft.types.errors import SyftException

        with quiet():
            try:
                result = self.client.users.create(name=name, email=email, password=password,
                                                  password_verify=password)
            except SyftException as error:
                raise ValueError(f"could not create {email} on {self.name}: {error.public_message}") from None
        if isinstance(result, sy.SyftError):
            raise ValueError(f"could not create {email} on {self.name}: {result.message}")

    def login(self, email: str, password: str):
        """Log in to this datasite, as the data scientist does from their own machine."""
        self.check_running()
        with quiet():
            if self.port is None:
                return self._handle.login(email=email, password=password)
            host = "127.0.0.1" if self.host in _EVERY_INTERFACE else self.host
            return sy.login(url=f"http://{host}", port=self.port, email=email, password=password)

    # --- code requests --------------------------------------------------------------------------------
    def pending_requests(self) -> list:
        """Code requests that wait for this owner's decision."""
        self.check_running()
        return [r for r in self.client.requests if str(r.status) == "RequestStatus.PENDING"]

    def _pending_named(self, function_name: str) -> list:
        return [
            r for r in self.pending_requests()
            if any(getattr(c, "service_func_name", None) == function_name for c in _codes_of(r))
        ]

    def pending_request(self, function_name: str):
        """The one pending request for ``function_name``, checked to carry exactly one code and no more.

        ``ValueError`` when there is none, more than one, or one that carries other code too.
        """
        matches = self._pending_named(function_name)
        if not matches:
            waiting = [c.service_func_name for r in self.pending_requests() for c in _codes_of(r)]
            raise ValueError(
                f"{self.name} has no pending request for a function named {function_name!r}; "
                f"pending: {waiting or 'none'}"
            )
        if len(matches) > 1:
            raise ValueError(
                f"{self.name} has {len(matches)} pending requests for a function named {function_name!r}; "
                "they may hold different code, so none is approved: deny them all "
                f"(deny({function_name!r}, reason)) and ask for one"
            )
        request = matches[0]
        codes = _codes_of(request)
        if len(request.changes) != 1 or len(codes) != 1:
            raise ValueError(
                f"{self.name}'s request for {function_name!r} carries {len(request.changes)} changes "
                f"(code: {[c.service_func_name for c in codes]}); only a request for exactly one function "
                "can be reviewed and approved: deny it"
            )
        if codes[0].nested_codes:
            raise ValueError(
                f"{function_name!r} calls other syft functions ({sorted(codes[0].nested_codes)}), which "
                "the review would not show; deny it"
            )
        return request

    def code_of(self, function_name: str) -> CodeReview:
        """The pending request for ``function_name`` as the owner reviews it: its inputs, run limit and code.

        The answer is a string (print it) that also records what was shown: the request id and a digest of
        the code and its policies. :meth:`approve` approves exactly that, or nothing.
        """
        request = self.pending_request(function_name)
        review = CodeReview.of(request, _codes_of(request)[0], self.client.datasets)
        self._reviews[function_name] = review
        return review

    def approve(self, function_name: str, digest: str | None = None) -> None:
        """Approve the pending request to run ``function_name`` on the private data, exactly as reviewed.

        Without ``digest`` the request must be the one this owner's last :meth:`code_of` showed, unchanged.
        With ``digest`` (``review.digest`` of a review of the same function, e.g. on another datasite) the
        request's code and policies must have that digest. Anything else raises ``ValueError``.
        """
        request = self.pending_request(function_name)
        current = CodeReview.of(request, _codes_of(request)[0], self.client.datasets)
        reviewed = self._reviews.get(function_name)
        if digest is None:
            if reviewed is None:
                raise ValueError(
                    f"{self.name} has not reviewed {function_name!r}: read it with "
                    f"code_of({function_name!r}) first, or pass digest= from the review of the same code"
                )
            if reviewed.request_id != current.request_id:
                raise ValueError(
                    f"the pending request for {function_name!r} is not the one {self.name} reviewed "
                    f"(reviewed {reviewed.request_id[:8]}, pending {current.request_id[:8]}); review it again"
                )
            digest = reviewed.digest
        if current.digest != digest:
            raise ValueError(
                f"{self.name}'s pending request for {function_name!r} differs from the reviewed code or "
                f"policies (digest {current.digest[:12]}, reviewed {digest[:12]}); review it again"
            )
        self._approve(request, function_name)
        self._reviews.pop(function_name, None)

    def _approve(self, request, function_name: str) -> None:
        with quiet():
            result = request.approve()
        if isinstance(result, sy.SyftError):
            raise RuntimeError(f"{self.name} could not approve {function_name!r}: {result.message}")

    def deny(self, function_name: str, reason: str) -> None:
        """Deny every pending request for ``function_name``; the data scientist sees ``reason``."""
        matches = self._pending_named(function_name)
        if not matches:
            self.pending_request(function_name)  # raises the clear "no pending request" error
        for request in matches:
            with quiet():
                result = request.deny(reason=reason)
            if isinstance(result, sy.SyftError):
                raise RuntimeError(f"{self.name} could not deny {function_name!r}: {result.message}")

    def runs(self, function_name: str) -> int:
        """How many times ``function_name`` has run on this owner's private data."""
        self.check_running()
        codes = [c for c in self.client.code.get_all() if c.service_func_name == function_name]
        if not codes:
            raise ValueError(f"{self.name} has never received a function named {function_name!r}")
        with quiet():
            return sum(len(self.client.api.services.output.get_by_user_code_id(c.id)) for c in codes)

    # --- lifecycle ------------------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Stop the datasite, free its port and delete its files. Safe to call twice."""
        if _running.get(self.name) is not self:
            return
        del _running[self.name]
        with quiet():
            self._handle.land()
        if self._process is not None:  # its port and folder are free once the process has ended
            self._process.join(timeout=syft_servers.ORPHAN_GRACE_S + 5)
        from syft.server.utils import get_named_server_uid

        shutil.rmtree(TEMP_ROOT / str(get_named_server_uid(self.name)), ignore_errors=True)

    def __enter__(self) -> DataOwner:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def _codes_of(request) -> list:
    """Every piece of code a request would approve: one per code change it carries."""
    from syft.service.request.request import UserCodeStatusChange

    with quiet():
        return [c.code for c in request.changes if isinstance(c, UserCodeStatusChange)]


# --- an HTTP owner's server, as an operating-system process ------------------------------------------------
def free_port(host: str = "127.0.0.1") -> int:
    """A port that the OS says is free right now (other programs may run servers at the same time)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def server_process(owner: DataOwner) -> psutil.Process:
    """The operating-system process that serves an HTTP owner's datasite."""
    if owner.port is None:
        raise ValueError(f"{owner.name} runs in memory, inside this process: start it with a port")
    if not owner.is_running:
        raise ValueError(f"{owner.name} has been shut down")
    process = owner._process
    if process is None or process.pid is None:
        raise RuntimeError(f"cannot find the server process of {owner.name} (syft's launcher changed?)")
    return psutil.Process(process.pid)


def memory_mb(owner: DataOwner) -> float:
    """An HTTP owner's server's share of memory in MB: PSS (:mod:`secure_ai.memory`), which adds up."""
    from .memory import pss

    return pss(server_process(owner).pid) / 1e6


def kill_owner(owner: DataOwner) -> int:
    """Really kill an HTTP owner's server (SIGKILL, as a crash or a pulled plug); returns its pid.

    The :class:`DataOwner` stays registered, so :func:`shutdown_all` still removes its files; its port is
    free again.
    """
    process = server_process(owner)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=10)
    _paused.discard(process.pid)
    return process.pid


def pause_owner(owner: DataOwner) -> int:
    """Freeze an HTTP owner's server (SIGSTOP): it accepts nothing until :func:`resume_owner`."""
    process = server_process(owner)
    process.send_signal(signal.SIGSTOP)
    _paused.add(process.pid)
    return process.pid


def resume_owner(owner: DataOwner) -> int:
    """Let a paused owner's server run again (SIGCONT); it then answers what it was asked."""
    process = server_process(owner)
    process.send_signal(signal.SIGCONT)
    _paused.discard(process.pid)
    return process.pid


def shutdown_all() -> None:
    """Resume any paused server (so it can stop cleanly), shut every running data owner down, and remove
    this process's syft folder, and hand the memory they held back to the operating system. Registered
    to run at exit."""
    for pid in list(_paused):
        try:
            psutil.Process(pid).send_signal(signal.SIGCONT)
        except psutil.NoSuchProcess:
            pass
        _paused.discard(pid)
    for owner in list(_running.values()):
        owner.shutdown()
    if _NAMED_ROOT:
        shutil.rmtree(TEMP_ROOT, ignore_errors=True)
    gc.collect()      # in-memory datasites hold reference cycles; their memory goes back to the system
    release_memory()


atexit.register(shutdown_all)
