"""levante: an inference engine for Mixtral, Mistral and Llama-architecture models."""

__version__ = "0.1.0"
