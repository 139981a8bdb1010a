"""``POST /v1/embeddings``: OpenAI's embeddings endpoint (string or list input, float or base64 vectors)."""

from __future__ import annotations

import asyncio
import base64
import struct

from fastapi import Request
from fastapi.responses import Response

from ..errors import ContextLengthError, WorkerError
from .http import json_response, request_body, state_of
from .protocol import APIError, EmbeddingRequest


def encode_base64(vec: list[float]) -> str:
    """OpenAI's base64 encoding: the little-endian float32 bytes of the vector."""
    return base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode("ascii")


async def embeddings(request: Request) -> Response:
    st = state_of(request)
    body = await request_body(request, EmbeddingRequest)
    if body.dimensions is not None:
        raise APIError(400, "dimensions is not supported: this model's embeddings have a fixed size "
                            f"({st.llm.config.hidden_size})", param="dimensions", code="invalid_value")
    items = body.items()
    for x in items:
        if isinstance(x, list):
            bad = next((t for t in x if not 0 <= t < st.vocab), None)
            if bad is not None:
                raise APIError(400, f"token id {bad} is out of range 0..{st.vocab - 1}", param="input",
                               code="invalid_value")
    loop = asyncio.get_running_loop()
    try:  # a forward pass: off the event loop
        vecs, n_tok = await loop.run_in_executor(None, st.llm._embed, items, body.pooling or "mean", True, False, 16)
    except ContextLengthError as e:
        raise APIError(400, str(e), param="input", code="context_length_exceeded") from None
    except WorkerError as e:
        raise APIError(503, str(e), type="server_error", code="unavailable") from None
    except ValueError as e:
        raise APIError(400, str(e), param="input", code="invalid_value") from None
    b64 = body.encoding_format == "base64"
    data = [{"object": "embedding", "index": i, "embedding": encode_base64(v) if b64 else v}
            for i, v in enumerate(vecs)]
    return json_response({"object": "list", "data": data, "model": st.model_id,
                          "usage": {"prompt_tokens": n_tok, "total_tokens": n_tok}})
