"""Exception types. Every user-facing failure is one of these, with a message naming the file/key/tensor."""


class LevanteError(Exception):
    """Base class of levante's own errors."""


class ConfigError(LevanteError, ValueError):
    """A model configuration is missing, unreadable or describes something levante cannot run."""


class MissingConfigError(ConfigError, FileNotFoundError):
    """No config.json / params.json (or equivalent) where one is required."""


class WeightsError(LevanteError, ValueError):
    """A weight file is corrupt or truncated, or a tensor is missing or has the wrong shape."""


class UnsupportedQuantError(WeightsError):
    """A tensor is stored in a quantization type levante cannot compute with."""


class ContextLengthError(LevanteError, ValueError):
    """A prompt (plus requested tokens) does not fit in the context window."""


class EngineError(LevanteError, RuntimeError):
    """A request failed inside the serving engine; the message is generic, the server log has the traceback."""


class OverloadedError(LevanteError):
    """The server's request queue is full; the client should retry later."""


class KernelBuildError(LevanteError, RuntimeError):
    """The C++ extension (levante/csrc) failed to compile or load on a machine that has a compiler."""


class DeviceMemoryError(LevanteError, MemoryError):
    """The model's weights or its KV cache do not fit in the device's free memory."""


class WorkerError(LevanteError, RuntimeError):
    """A rank of a tensor- or expert-parallel group died, failed, or fell out of step; the model is unusable."""
