"""The `tli` command: parse arguments, call a stage, turn user errors into one line.

One module per command under ``tli.cli`` declares ``NAME``, ``HELP`` and ``DESCRIPTION``,
``add_arguments(parser)`` and ``run(args) -> exit code``, which parses the options into config
dataclasses, calls the stage and prints a summary. Only these modules know argparse. This file
only registers them and dispatches.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import typing

from tli.errors import TLIError

#: Command modules, in the order `tli --help` lists them.
COMMANDS = (
    "tli.cli.run",
    "tli.cli.pairs",
    "tli.cli.embed",
    "tli.cli.scan",
    "tli.cli.train",
    "tli.cli.evaluate",
    "tli.cli.probe",
    "tli.cli.plot",
    "tli.cli.sweep",
    "tli.cli.compare",
)

log = logging.getLogger("tli")


#: Every character that ``str.splitlines`` treats as a line boundary.
_BREAKS = "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"


def one_line(message: str) -> str:
    """``message`` with each line break written as an escape: a path or value may hold one."""
    if not any(ch in message for ch in _BREAKS):
        return message
    return "".join(
        ch.encode("unicode_escape").decode("ascii") if ch in _BREAKS else ch for ch in message
    )


class OneLineParser(argparse.ArgumentParser):
    """An argparse parser whose usage errors are one ``tli: error:`` line and exit code 2."""

    def error(self, message: str) -> typing.NoReturn:  # noqa: D102
        self.exit(2, f"tli: error: {self.prog}: {one_line(message)}\n")


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser, with one subcommand per stage."""
    from tli import __version__

    parser = OneLineParser(
        prog="tli",
        description="Targeted Lexical Injection: find, train and honestly measure "
        "cross-lingual lexical alignment in language models.",
    )
    parser.add_argument("--version", action="version", version=f"tli {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    parser.add_argument(
        "--threads",
        type=_positive_int,
        metavar="N",
        help="CPU threads for torch (default: $TLI_THREADS, else torch's own choice); "
        "on a busy machine 1 thread can win (docs/benchmarks.md)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    for name in COMMANDS:
        command = importlib.import_module(name)
        p = sub.add_parser(command.NAME, help=command.HELP, description=command.DESCRIPTION)
        command.add_arguments(p)
        p.set_defaults(func=command.run)
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


#: The environment variable that sets ``--threads`` when the option is not given.
THREADS_ENV = "TLI_THREADS"


def set_threads(option: int | None) -> int | None:
    """Set torch's CPU threads from ``--threads``, else ``$TLI_THREADS``; return the number set.

    Raises:
        TLIError: ``$TLI_THREADS`` is not a positive integer.
    """
    value = option
    if value is None:
        text = os.environ.get(THREADS_ENV, "").strip()
        if not text:
            return None
        try:
            value = _positive_int(text)
        except argparse.ArgumentTypeError as err:
            raise TLIError(f"{THREADS_ENV}: {err}") from None
    import torch

    torch.set_num_threads(value)
    log.debug("torch threads: %d", value)
    return value


class _OneLine(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"tli: {record.levelname.lower()}: {record.getMessage()}"


def _setup_logging(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_OneLine())
    log.handlers[:] = [handler]
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    log.propagate = False


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `tli` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # The command line as typed, for records that say how to repeat a run (model cards).
    args.argv = list(sys.argv[1:] if argv is None else argv)
    _setup_logging(args.verbose)
    if not getattr(args, "func", None):
        _say("tli: error: no command given (`tli --help` lists them)")
        return 2
    from tli.console import third_party_routed

    stdout = sys.stdout
    try:
        set_threads(args.threads)
        if stdout is not None:  # None when tli was started with stdout closed
            sys.stdout = _Stdout(stdout)
        with third_party_routed():
            code = int(args.func(args) or 0)
        if stdout is not None:
            sys.stdout.flush()
        return code
    except _StdoutFailed as failed:  # stdout is a full disk (> /dev/full) or a bad device
        _stdout_closed()
        _say(f"tli: error: stdout: cannot write: {failed.reason}")
        return 2
    except TLIError as err:
        _say(f"tli: error: {one_line(str(err))}")
        return 2
    except KeyboardInterrupt:
        _say("tli: interrupted")
        return 130
    except BrokenPipeError:
        return _stdout_closed()
    finally:
        if stdout is not None and isinstance(sys.stdout, _Stdout):
            sys.stdout = stdout


def _say(line: str) -> None:
    """Print ``line`` on stderr; when stderr is closed (``2>&-``) there is nowhere to say it."""
    try:
        print(line, file=sys.stderr, flush=True)
    except (OSError, ValueError, AttributeError):
        pass


class _StdoutFailed(Exception):
    """Writing to stdout failed (not a closed pipe); ``reason`` is the OS's words."""

    def __init__(self, err: OSError) -> None:
        super().__init__(err)
        self.reason = err.strerror or str(err)


class _Stdout:
    """stdout for the duration of a command: a failed write becomes :class:`_StdoutFailed`.

    So a full disk behind ``> FILE`` is told apart from an internal error (a plain OSError).
    """

    def __init__(self, stream: typing.TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:  # noqa: D102
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            raise
        except OSError as err:
            raise _StdoutFailed(err) from None

    def flush(self) -> None:  # noqa: D102
        try:
            self._stream.flush()
        except BrokenPipeError:
            raise
        except OSError as err:
            raise _StdoutFailed(err) from None

    def __getattr__(self, name: str) -> typing.Any:
        return getattr(self._stream, name)


def _stdout_closed() -> int:
    """The reader of stdout went away (``tli pairs check FILE | head -3``): stop quietly.

    What could not be printed is dropped; stdout is pointed at /dev/null so that Python's own
    flush at exit does not fail again. Exit code 141 (128 + SIGPIPE), as a shell reports a
    command that a closed pipe stopped.
    """
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout has no file descriptor (e.g. captured in tests)
        pass
    return 141


if __name__ == "__main__":
    sys.exit(main())
