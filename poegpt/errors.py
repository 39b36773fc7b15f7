"""User-facing errors.

Anything a user can get wrong (a config value, a path, a mode argument) raises `PoEError` with one
sentence saying what is wrong and what to do. The CLI prints it as a single line and exits 2;
library callers get an ordinary exception (it subclasses ValueError).
"""


class PoEError(ValueError):
    """A bad input, stated in one line: what was wrong and what to do."""
