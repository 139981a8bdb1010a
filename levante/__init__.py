"""levante: an inference engine for Mixtral, Mistral and Llama-architecture models."""

from .api import LLM
from .errors import ConfigError, ContextLengthError, LevanteError, WeightsError
from .grammar import Grammar, GrammarError
from .hf import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoModelForTokenClassification, AutoTokenizer
from .loader import load
from .sampling import SamplingParams

LlamaGrammar = Grammar  # llama-cpp-python's name: LlamaGrammar.from_string(gbnf) / .from_json_schema(schema)

__version__ = "0.1.0"
__all__ = [
    "LLM",
    "Grammar",
    "GrammarError",
    "LlamaGrammar",
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
