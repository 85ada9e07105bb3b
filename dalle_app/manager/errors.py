"""Errors raised by the model manager: each one is a single sentence a user can act on."""


class ModelLoadError(Exception):
    """A model reference, download or checkpoint could not be turned into a model.

    The message is one sentence that names the problem and the fix; the original exception,
    when there is one, is chained as ``__cause__`` for debugging.
    """
