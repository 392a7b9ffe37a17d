"""`mixtrt serve`: an OpenAI-compatible HTTP server with continuous batching over one Engine.

    protocol.py   the request bodies (pydantic, strict) and their mapping to GenerationConfig; OpenAI's error object
    scheduler.py  the engine loop: one thread owns the backend and its Engine; requests join between steps
    metrics.py    Prometheus metrics (`mixtrt:` names, in vLLM's style)
    app.py        the FastAPI app (`create_app`): routes, request checks, responses and streams
    logprobs.py   OpenAI's logprobs objects (completions' and chat's) from the Engine's arrays
    runner.py     the uvicorn runner `mixtrt serve` uses (SIGTERM: drain, exit 0)
    ray_app.py    the same app as a Ray Serve deployment

Needs the `serve` extra (FastAPI, uvicorn, prometheus-client); `ray_app` needs `ray`.
"""
