"""The exceptions users see (a message that says what failed and what to do), and `shown`, which makes
anything a user stored safe to put in such a message or on a terminal."""


class RetrievalError(Exception):
    """Bad input or a bad file on disk. The CLI prints its message as one line and exits 1."""


class ImageError(RetrievalError):
    """An image that cannot be read: missing, corrupt, truncated, not an image, or too large."""


class IndexChanged(RetrievalError):
    """Another process published a new generation of an index while this one read it: open it again (the
    server does so by itself and answers 503 until it has)."""


class NoSpaceError(RetrievalError):
    """A write to an index failed because its disk is full; what was committed before it is intact."""


class ReadOnlyError(RetrievalError):
    """A write to an index failed because its folder or disk cannot be written; it can still be searched."""


def shown(text: object) -> str:
    """A stored string as data for a terminal: as it is when printable, else with control characters escaped
    (\\n, \\x1b, \\u202e: no id or caption can fake an output line or colour the screen) and bytes that were not
    UTF-8 (surrogate escapes from a file name) as \\xNN."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else f"\\x{ord(c) - 0xDC00:02x}" if 0xDC80 <= ord(c) <= 0xDCFF
                   else c.encode("unicode_escape", "backslashreplace").decode("ascii") for c in text)
