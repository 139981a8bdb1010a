"""OpenAI-compatible HTTP server (`levante serve`)."""

from .app import create_app

__all__ = ["create_app", "serve"]


def serve(llm, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info", **kwargs) -> None:
    """Run the server for `llm` until interrupted (kwargs go to `create_app`). When the model is lost (a parallel
    rank died) the server stops and this raises SystemExit(1)."""
    import uvicorn

    app = create_app(llm, **kwargs)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                           timeout_graceful_shutdown=5))
    st = app.state.server
    st.on_fatal = lambda: setattr(server, "should_exit", True)
    server.run()
    if st.fatal is not None:
        raise SystemExit(f"levante serve: {st.fatal}")
