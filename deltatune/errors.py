"""The one exception deltatune raises for user errors."""


class DeltaTuneError(ValueError):
    """A user error: the message names the problem and the fix."""
