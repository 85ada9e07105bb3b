"""The error of a request the user can fix (raised by the service and its helpers)."""


class RequestError(ValueError):
    """A request the user can fix; the message is one sentence."""
