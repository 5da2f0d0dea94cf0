"""What reaches stderr: tli's own ``tli:`` lines, and progress bars only on a terminal.

The libraries tli builds on write notices of their own (transformers' and bitsandbytes'
loggers, peft's and torch's Python warnings, tqdm bars). While a command runs
(:func:`third_party_routed`), each of them becomes one line of tli's log instead: a ``tli: debug:``
line (shown with ``tli -v``), or a ``tli: warning:`` line for a library's error record.
Progress bars of the libraries are shown only when stderr is a terminal (:func:`bars_on_terminal`).
"""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

log = logging.getLogger("tli")


class _ToTli(logging.Handler):
    """Re-emit a library's log record as one line of tli's log."""

    def emit(self, record: logging.LogRecord) -> None:
        if record.name == "tli" or record.name.startswith("tli."):
            return  # tli's own records have their own handler
        try:
            text = record.getMessage()
        except Exception:  # a library's bad format string must not break the command
            text = str(record.msg)
        lines = text.strip().splitlines()
        first = lines[0] if lines else ""
        level = logging.WARNING if record.levelno >= logging.ERROR else logging.DEBUG
        name = "python warning" if record.name == "py.warnings" else record.name
        log.log(level, "%s: %s", name, first)


def adopt_transformers_logging() -> None:
    """Send transformers' log records through the root logger (to :class:`_ToTli`).

    transformers writes to stderr through its own handler and stops its records from reaching
    the root logger; tli turns both off once transformers is imported. It is a no-op unless a
    command is running (:func:`third_party_routed`).
    """
    if not _ROUTING:
        return
    from transformers.utils import logging as hf_logging

    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()


_ROUTING: list[bool] = []


@contextmanager
def third_party_routed() -> Iterator[None]:
    """For the block, route every library's log record and Python warning into tli's log.

    The root logger gets a handler that re-emits records as ``tli:`` lines; Python warnings
    are captured into logging (``logging.captureWarnings``); transformers' own handler is
    switched off (:func:`adopt_transformers_logging`). Everything is put back afterwards.
    """
    root = logging.getLogger()
    handler = _ToTli()
    root.addHandler(handler)  # the root keeps its level: libraries' warnings and errors
    _ROUTING.append(True)
    hf = None
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf

        adopt_transformers_logging()
    with warnings.catch_warnings():  # the filters stay; only where warnings go changes
        logging.captureWarnings(True)
        try:
            yield
        finally:
            logging.captureWarnings(False)
            _ROUTING.pop()
            root.removeHandler(handler)
            if hf is not None or "transformers" in sys.modules:
                from transformers.utils import logging as hf

                hf.enable_default_handler()
                hf.disable_propagation()


def bars_on_terminal(tqdm_class: Any) -> Any:
    """``tqdm_class`` that draws its bar only when stderr is a terminal (``disable=None``)."""
    import functools

    return functools.partial(tqdm_class, disable=None)
