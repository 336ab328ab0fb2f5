"""The one exception type users see: a message that says what failed and what to do."""


class RetrievalError(Exception):
    """Bad input or a bad file on disk. The CLI prints its message as one line and exits 1."""


class ImageError(RetrievalError):
    """An image that cannot be read: missing, corrupt, truncated, not an image, or too large."""


class NoSpaceError(RetrievalError):
    """A write to an index failed because its disk is full; what was committed before it is intact."""


class ReadOnlyError(RetrievalError):
    """A write to an index failed because its folder or disk cannot be written; it can still be searched."""
