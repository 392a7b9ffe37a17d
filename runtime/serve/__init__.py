"""`mixtrt serve`: an OpenAI-compatible HTTP server with continuous batching over one Engine.

    protocol.py   the request bodies (pydantic, strict) and their mapping to GenerationConfig; OpenAI's error object
    scheduler.py  the engine loop: one thread owns the backend and its Engine; requests join between steps
    metrics.py    Prometheus metrics (`mixtrt:` names, in vLLM's style)
    app.py        the FastAPI app (`create_app`) and the uvicorn runner `mixtrt serve` uses
    ray_app.py    the same app as a Ray Serve deployment

Needs the `serve` extra (FastAPI, uvicorn, prometheus-client); `ray_app` needs `ray`.
"""
