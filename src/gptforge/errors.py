"""The one exception type users see: its message is the whole story, printed on one line."""


class GPTForgeError(Exception):
    """A user-facing error: bad input, bad config, a damaged file. The CLI prints it and exits 1."""
