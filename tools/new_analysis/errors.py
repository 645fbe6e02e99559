"""The one error the new-analysis command raises: a message a physicist can act on."""


class ForkError(Exception):
    """A new analysis that cannot be created; nothing was written. The message says why and
    what to do instead."""
