"""Pure-Python tokenizers: SentencePiece BPE (Llama/Mistral) and GPT-2 style byte-level BPE.

No runtime dependency on sentencepiece / tokenizers: model files (``tokenizer.model`` protobuf,
``tokenizer.json``, GGUF metadata) are parsed here directly. base: the interface, token types and the BPE
merge loop; sentencepiece / bpe: the two tokenizers; hf_json: tokenizer.json parts; load: finding and
building one for a model.
"""

from .base import (
    BYTE,
    BYTE_DECODER,
    BYTE_ENCODER,
    CONTROL,
    EOS_LIKE_TOKENS,
    GPT2_PATTERN,
    LLAMA3_PATTERN,
    NORMAL,
    PRE_TOKENIZERS,
    SPACE,
    UNKNOWN,
    UNUSED,
    USER_DEFINED,
    StreamDecoder,
    Tokenizer,
    bpe_merge,
)
from .bpe import GPT2BPETokenizer
from .load import load_tokenizer, tokenizer_from_gguf_fields, tokenizer_from_json
from .sentencepiece import SentencePieceTokenizer, parse_sentencepiece_model

__all__ = [
    "BYTE", "BYTE_DECODER", "BYTE_ENCODER", "CONTROL", "EOS_LIKE_TOKENS", "GPT2_PATTERN", "LLAMA3_PATTERN",
    "NORMAL", "PRE_TOKENIZERS", "SPACE", "UNKNOWN", "UNUSED", "USER_DEFINED", "GPT2BPETokenizer",
    "SentencePieceTokenizer", "StreamDecoder", "Tokenizer", "bpe_merge", "load_tokenizer",
    "parse_sentencepiece_model", "tokenizer_from_gguf_fields", "tokenizer_from_json",
]
