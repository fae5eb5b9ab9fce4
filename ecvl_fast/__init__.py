"""ecvl-fast: long-tailed CLIP classifiers (ECVL) with an FFCV + DALI data path.

Importing this package is cheap: ffcv, DALI and open_clip load only where they are used.
"""

__version__ = "0.1.0"


class EcvlError(Exception):
    """A user-facing error: the CLI prints its one-line message and exits non-zero."""


def first_line(e: BaseException) -> str:
    """`Type: first line of the message` (an empty message gives the type alone)."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__
