"""levante: an inference engine for Mixtral, Mistral and Llama-architecture models."""

from .api import LLM
from .errors import ConfigError, ContextLengthError, LevanteError, WeightsError
from .loader import load
from .sampling import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "load", "SamplingParams", "LevanteError", "ConfigError", "WeightsError", "ContextLengthError"]
