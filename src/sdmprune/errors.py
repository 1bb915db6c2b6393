"""The one exception type the tool raises for bad input; the CLI prints its message on one line."""


class SdmpruneError(Exception):
    """Bad input or an impossible request. The message says what was wrong and what to do."""
