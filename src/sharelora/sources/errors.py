"""The one exception type of :mod:`sharelora.sources`."""


class SourceError(RuntimeError):
    """A named source could not be found, fetched, verified or loaded.

    The message always says what went wrong *and* what would fix it (a known name, an
    environment variable, a file to copy into the cache, a package to install).
    """
