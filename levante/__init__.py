"""levante: an inference engine for Mixtral, Mistral and Llama-architecture models."""

from .api import LLM
from .errors import ConfigError, ContextLengthError, LevanteError, WeightsError
from .hf import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoModelForTokenClassification, AutoTokenizer
from .loader import load
from .sampling import SamplingParams

__version__ = "0.1.0"
__all__ = [
    "LLM",
    "AutoModelForCausalLM",
    "AutoTokenizer",
    "AutoModelForSequenceClassification",
    "AutoModelForTokenClassification",
    "load",
    "SamplingParams",
    "LevanteError",
    "ConfigError",
    "WeightsError",
    "ContextLengthError",
]
