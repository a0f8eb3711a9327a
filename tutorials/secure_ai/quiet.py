"""Keep syft's and Opacus's banners, log lines, warnings and upload bars out of the reader's way.

syft 0.9.5 talks a lot: a CRITICAL log line per server start, "Using SQLiteDBConfig", SyftInfo/SyftSuccess
boxes, "Approving request ..." prints, tqdm "Uploading" bars and many Python warnings. The helper wraps its
own syft calls in :func:`quiet`; set ``SECURE_AI_VERBOSE=1`` to see everything again while debugging.
Opacus warns about its secure RNG and backward hooks on every call: :func:`quiet_opacus` hides only those.
"""
from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator

NOISY_LOGGERS = ("syft", "syftbox", "uvicorn", "opentelemetry", "kr8s", "httpx")


def verbose() -> bool:
    """True when ``SECURE_AI_VERBOSE`` is set to 1/true: nothing is hidden then."""
    return os.environ.get("SECURE_AI_VERBOSE", "").lower() in ("1", "true", "yes")


def silence_logging() -> None:
    """Raise syft's (and its servers') loggers above CRITICAL for the rest of the process."""
    if verbose():
        return
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.CRITICAL + 1)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Swallow stdout, stderr, rich displays (IPython) and warnings printed inside the block.

    Exceptions still propagate with their own message.
    """
    if verbose():
        yield
        return
    from IPython.utils.capture import capture_output

    silence_logging()
    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        with warnings.catch_warnings(), capture_output(display=True):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


@contextlib.contextmanager
def quiet_opacus() -> Iterator[None]:
    """Hide Opacus's warnings (secure RNG off, backward hooks) inside the block; errors still propagate."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module="opacus")
        warnings.filterwarnings("ignore", message=".*[Ss]ecure RNG.*")
        warnings.filterwarnings("ignore", message=".*backward hook.*")
        yield
