"""The project's own error type: bad user input, reported as one line with exit code 2."""


class TLIError(Exception):
    """A problem with the user's input (file, record, option), not a bug in tli.

    The CLI prints ``tli: error: <message>`` on one line to stderr and exits with code 2,
    without a traceback. Anything else that escapes is an internal bug and keeps its traceback.
    """


def first_line(err: BaseException | str) -> str:
    """The first non-blank line of an exception's message (or its type name), for one-line errors.

    Third-party errors (transformers, peft, safetensors) often carry pages of text; tli quotes
    only their first line inside its own one-line message.
    """
    lines = str(err).strip().splitlines()
    if lines:
        return lines[0]
    return type(err).__name__ if isinstance(err, BaseException) else ""
