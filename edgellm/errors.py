"""The one exception type users see: a message that says what is wrong and what to do."""


class EdgeLLMError(Exception):
    """A user-facing error. The CLI prints `edgellm: <message>` on one line and exits non-zero."""

    exit_code = 1


class ModelNotFound(EdgeLLMError):
    exit_code = 2


class InvalidModel(EdgeLLMError):
    exit_code = 3


class CacheTrimError(EdgeLLMError):
    """The KV cache could not drop a tail and was emptied (Engine.truncate); the caller decodes again."""
