"""One exception type for every user-facing failure.

The CLI catches `EdgepackError` and prints its message as a single line (exit code 2), so bad
input never shows a traceback. Raise it with a message that names the file or setting at fault.
"""


class EdgepackError(Exception):
    """A failure the user can act on: bad input, missing file, failed check."""
