"""OpenAI-compatible HTTP server (`levante serve`)."""

from .app import create_app

__all__ = ["create_app", "serve"]


def serve(llm, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info", **kwargs) -> None:
    """Run the server for `llm` until interrupted (kwargs go to `create_app`)."""
    import uvicorn

    uvicorn.run(create_app(llm, **kwargs), host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
