"""The leaf of the package's import graph: the data error, its one-line formatter and the
data-directory variable, shared by :mod:`jaxnets.data` and :mod:`jaxnets.download` (which
import them from here, so that neither imports the other at module level: issue 22)."""

#: Environment variable consulted when ``data_dir`` is not given.
DATA_DIR_ENV = "JAXNETS_DATA_DIR"


class DataError(Exception):
    """A dataset could not be loaded: missing, truncated, corrupt or inconsistent files,
    or tensorflow-datasets could not provide it. The message is a single line."""


def one_line(e: BaseException, limit: int = 160) -> str:
    """``e``'s message on one line (whitespace runs folded), cut to ``limit`` characters."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."
