"""The project's own error type: bad user input, reported as one line with exit code 2."""


class TLIError(Exception):
    """A problem with the user's input (file, record, option), not a bug in tli.

    The CLI prints ``tli: error: <message>`` on one line to stderr and exits with code 2,
    without a traceback. Anything else that escapes is an internal bug and keeps its traceback.
    """
