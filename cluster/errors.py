"""Typed errors for everything a user (a request, a config, a checkpoint) can trigger."""


class ClusterError(Exception):
    """Base of every error this project raises on purpose."""


class CheckpointError(ClusterError):
    """A model directory that cannot be read: missing files, bad names, bad shapes."""


class UnsupportedCheckpointError(CheckpointError):
    """A well-formed checkpoint this engine does not run yet (FP8, unknown model type)."""


class CheckpointFileError(CheckpointError):
    """A file of the model directory is missing, truncated or not what its name says."""


class TensorMismatchError(CheckpointError):
    """A tensor the engine reads is missing, or its shape or dtype is not what config.json implies."""


class TokenizerMismatchError(CheckpointError):
    """tekken.json is missing, or its image section does not match the vision tower."""


class ConfigError(ClusterError):
    """An invalid configuration value; the message names the field."""


class KVPoolTooSmallError(ConfigError):
    """The KV pool cannot hold what the config asks (a block, or `max_model_len` tokens); the
    message gives the pool's bytes, the bytes per token and the tokens that fit."""


class RequestError(ClusterError):
    """A bad request: the engine refuses it and keeps serving the others."""


class PromptTooLongError(RequestError):
    """The prompt does not fit the context length (or the whole KV pool)."""


class InvalidTokenError(RequestError):
    """A token id outside the vocabulary."""


class InvalidSamplingParamsError(RequestError):
    """A sampling value out of range; the message names the field."""


class DuplicateRequestError(RequestError):
    """A request id that is already running."""


class InvalidGrammarError(RequestError):
    """A response format, tool schema or grammar the structured-output library cannot take;
    `field` names the part of the request."""

    def __init__(self, field: str, detail: str) -> None:
        super().__init__(f"{field}: {detail}")
        self.field = field


class ScriptError(ClusterError):
    """A `--script` that no bigram automaton can emit (a token with two successors)."""
