"""One exception type for bad user input: the CLI prints its message, never a traceback."""


class TokenselError(Exception):
    """A problem with the user's input, naming the file, row and column where it can."""
