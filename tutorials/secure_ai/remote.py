"""The data scientist's side of syft 0.9.5: request a function on a datasite, run it once approved.

Every chapter's request and call go through here: :func:`request` submits ``function(**assets, weights)``
for at most ``rounds`` runs, whatever assets it binds (MNIST, a DP policy, a secure-aggregation key);
:func:`run` calls the approved function with a new ``weights`` message and brings its answer back.
``federated.request_training``/``train_remotely``, ``secagg.request_step``/``call_step`` and
``scale.remote_trainer`` are thin wrappers that choose the assets. A refusal is a :class:`RemoteError`
with syft's public reason, without its traceback. An HTTP datasite that does not answer within the HTTP
timeout (300 s by default; :func:`set_http_timeout` chooses it per client) fails the call with
:class:`RemoteTimeout`.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from contextlib import contextmanager

import requests

from .datasites import sy
from .quiet import quiet
from .runtime import release_memory
from .syft_servers import set_http_timeout  # noqa: F401 - the data scientist's knob, re-exported here


def check_rounds(rounds: int) -> None:
    """``ValueError`` unless ``rounds`` (the runs a request asks for) is a positive integer."""
    if not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be a positive integer, got {rounds!r}")


def request(client, function: Callable, rounds: int, assets: Mapping[str, object]):
    """Ask ``client``'s datasite to run ``function(**assets, weights)`` at most ``rounds`` times.

    ``assets`` binds arguments to assets of that datasite; ``weights`` is the one argument the data
    scientist chooses anew on every call (any dict of its own). Returns the submitted syft function.
    """
    check_rounds(rounds)
    from syft.service.policy.policy import OutputPolicyExecuteCount

    with quiet():
        submitted = sy.syft_function(
            input_policy=sy.MixedInputPolicy(client=client, **assets, weights=dict),
            output_policy=OutputPolicyExecuteCount(limit=rounds),
        )(function)
        result = client.code.request_code_execution(submitted)
    if isinstance(result, sy.SyftError):
        raise RemoteError(clean_message(result.message))
    return submitted


def run(client, function_name: str, message: Mapping, assets: Mapping[str, object], threaded: bool = False,
        requested_with: str = "request"):
    """Run the approved ``function_name`` on ``client``'s datasite with ``weights=message``; its answer.

    Pass the ``assets`` the request bound. ``threaded=True`` calls from a worker thread (see
    :func:`call_unsilenced`). ``requested_with`` names the function that requests it, for the error
    raised when the datasite holds no such function.
    """
    with _timeout_is_a_remote_error():  # syft may fetch the datasite's API first
        remote = getattr(client.code, function_name, None)
    if remote is None:
        raise ValueError(f"{client.name} has no function {function_name!r}; request it with {requested_with}")
    return (call_unsilenced if threaded else call)(remote, **assets, weights=dict(message))


class RemoteError(RuntimeError):
    """A datasite refused or failed a request. The message is syft's public one, without its traceback."""


class RemoteTimeout(RemoteError, TimeoutError):
    """An HTTP datasite accepted a call and did not answer within the HTTP timeout (syft_patches fix 11)."""


def _timed_out(error: Exception) -> RemoteTimeout:
    return RemoteTimeout(f"the datasite did not answer in time ({error}): a frozen, overloaded or "
                         "unreachable owner, or a call longer than set_http_timeout allows")


@contextmanager
def _timeout_is_a_remote_error():
    try:
        yield
    except requests.Timeout as error:
        raise _timed_out(error) from None


_HINTS = {
    "Output policy is not valid": "the owner approved a limited number of runs and they are used up",
    "waiting for approval": "the owner has not reviewed this request yet",
    "not in allowed inputs": "the approval pins the objects this function may run on",
}
# syft's refusal of an input the approval did not pin ends with every pinned id, per datasite: left out
_PINNED_IDS = re.compile(r"(not in allowed inputs):\s*\{.*\}$", re.S)


def clean_message(message: str) -> str:
    """syft's public message without its "<class ...>" prefix, with a hint where we know what it means."""
    message = re.sub(r"^<class '[^']+'>\s*", "", str(message)).strip()
    message = _PINNED_IDS.sub(r"\1", message)
    hints = [hint for key, hint in _HINTS.items() if key in message]
    return f"{message} ({hints[0]})" if hints else message


def call(function, **kwargs):
    """Run an approved syft function on a datasite and bring its result back (the ``.get()``).

    Raises :class:`RemoteError` with the owner's reason when the request was denied, is still pending,
    or has used up its approved runs.
    """
    with quiet():
        return call_unsilenced(function, **kwargs)


def call_unsilenced(function, **kwargs):
    """:func:`call` without hiding syft's output, for calls made from several threads at once.

    :func:`secure_ai.quiet.quiet` swaps the process-wide ``sys.stdout``, which is not safe from threads: a
    caller that runs calls concurrently silences them once, around all of them (see :mod:`secure_ai.scale`).
    """
    from syft.types.errors import SyftException

    try:
        result = function(**kwargs)
        value = result.get() if isinstance(result, sy.ActionObject) else result
    except SyftException as error:
        raise RemoteError(clean_message(error.public_message)) from None
    except requests.Timeout as error:
        raise _timed_out(error) from None
    finally:
        # syft's serialized copies are garbage now; without this they stay in the process's heap (in a
        # notebook, 0.1-0.2 GB after a few dozen calls, more when calls run in threads)
        release_memory()
    if isinstance(value, sy.SyftError):
        raise RemoteError(clean_message(value.message))
    return value

