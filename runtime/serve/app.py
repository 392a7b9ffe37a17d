"""The OpenAI-compatible FastAPI app over one EngineLoop (runner.py serves it with uvicorn).

    app = create_app(ServeSettings("engines/tiny-mixtral-fp32", max_batch=16))
    uvicorn.run(app, host="127.0.0.1", port=8000)

Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models (API key when set), GET /health and
/ping (503 while loading, 200 after), GET /version, GET /metrics (Prometheus text). The artifact loads in a
thread after the server starts listening, so /health answers at once. Errors are OpenAI's error object: 400 naming the
field, 401, 404 (an unknown model), 413 (body over max_body_bytes), 429 (queue full), 503 (loading,
shutting down). One JSON log line per request (logger `mixtrt.serve`): id, tokens, timings, finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import hmac
import json
import logging
import os
import re
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from mixtrt.runtime.errors import BackendError, ConfigError
from mixtrt.runtime.generation import STRUCTURED, EngineEvent, GenerationOutput, Generator, calls_suppressed
from mixtrt.runtime.prompts import check_messages_text, check_text, normalize_prompts, outside_vocab
from mixtrt.runtime.serve.logprobs import (
    TextOffsets,
    TokenTexts,
    chat_logprobs,
    completion_logprobs,
    merge,
    prompt_logprobs,
)
from mixtrt.runtime.serve.metrics import Metrics
from mixtrt.runtime.serve.protocol import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    chat_messages,
    check_continuation,
    length_field,
    overrides,
    parse,
    reply_constraint,
)
from mixtrt.runtime.serve.responses import response_object, responses_error, stream_events, to_chat
from mixtrt.runtime.serve.scheduler import Cancelled, EngineLoop, NotAccepting, QueueFull
from mixtrt.runtime.serve.scheduler import Request as EngineRequest
from mixtrt.runtime.tool_calls import ToolStream, ToolUse, chat_prompt, tool_use

log = logging.getLogger("mixtrt.serve")


@dataclass
class ServeSettings:
    artifact: str | Path
    model_name: str | None = None  # the `model` clients name; default: the artifact directory's name
    max_batch: int = 16  # engine rows decoding together
    max_queue: int = 64  # rows that may wait for a free engine row; past it 429
    api_key: str | None = None
    backend: str = "onnxruntime"  # or triton / tensorrt (Generator.load)
    threads: int | None = None  # onnxruntime intra-op threads
    verify: bool = True  # check the artifact's file hashes at load
    max_body_bytes: int = 4 << 20
    drain_s: float = 30.0  # SIGTERM: running requests get this long to finish
    # while rows decode, an engine step prefills at most this many prompt tokens (a longer prompt is split
    # across steps), so a decoding row waits for at most one chunk per step; 0: no limit. 16: README's Serving
    # benchmark (32 gave 8-14% more tokens/s at 16 clients, and an ITL p99 above llama-server's in most runs)
    prefill_chunk: int = 16
    # the chunk runs in the decode step's pass (one read of the weights for both), where the backend can
    # (onnxruntime); False: a pass of its own. With max_batch 1 no row decodes beside a prefill: not used
    mixed_steps: bool = True
    # origins whose browser pages may call the server (CORS); ("*",): any, as vLLM and llama-server allow; (): none
    allowed_origins: tuple[str, ...] = ("*",)

    @property
    def name(self) -> str:
        """The model's id: --model-name, else the artifact folder's name as given (`.` named; a symlink's own name,
        so `models/current -> v2` serves `current` through every rollout)."""
        return self.model_name or Path(os.path.abspath(self.artifact)).name

    def load_generator(self) -> Generator:
        """The artifact as the server runs it (the plain server and each Ray replica): mixed steps unless asked
        not to or with max_batch 1, where no row decodes beside a prefill."""
        return Generator.load(self.artifact, backend=self.backend, threads=self.threads, verify=self.verify,
                              mixed_steps=self.mixed_steps and self.max_batch > 1)


@dataclass
class _State:
    settings: ServeSettings
    generator: Generator | None = None
    loop: EngineLoop | None = None
    metrics: Metrics | None = None
    error: BaseException | None = None
    load_s: float = 0.0
    texts: TokenTexts | None = None  # token texts for logprobs (set at load)
    loader: threading.Thread | None = None  # the load (a daemon thread: a stop while loading does not wait for it)
    closing: bool = False  # the server stopped: a load that ends now starts no engine loop
    forced: bool = False  # the server's forced exit (a second Ctrl-C): the handlers it cancels were cut by it
    body_bytes: int = 0  # request body bytes being read now, all requests together (_read_body's budget)

    @property
    def loading(self) -> bool:
        return self.loader is not None and self.loader.is_alive()


def create_app(settings: ServeSettings, generator: Generator | None = None,
               on_load_error: Any = None, freeze_gc: bool = False, load_s: float = 0.0,
               behind_proxy: bool = False) -> FastAPI:
    """The app; `generator` (already loaded) is used instead of loading settings.artifact, `load_s` the seconds
    its load took (the ready line's load time counts them). on_load_error(e) is called when loading fails (the CLI
    stops the server); /health then stays 503 with the error. freeze_gc: the process is the server's (the CLI, a
    Ray replica): once loaded, what is alive is moved out of the garbage collector's sight (`gc.freeze`), so a full
    collection scans only what requests made. behind_proxy: Ray Serve's proxy is in front; it gives every request
    an X-Request-Id (the client's as sent, else its own) and puts it on the response, so the app takes that id as
    it is and adds no header of its own (a response carried two, which differed for an id the app would not take);
    and it cancels the handler of a client that left, so a cancelled handler is a disconnect (without the proxy,
    uvicorn says http.disconnect, and cancels handlers only to stop the server)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = _State(settings, metrics=Metrics(settings.name))
        app.state.mixtrt = state
        events = asyncio.get_running_loop()

        def load() -> None:
            _load(state, generator, freeze_gc, load_s)
            if state.error is not None and on_load_error is not None:
                with contextlib.suppress(RuntimeError):  # the server's loop is closed: it stopped meanwhile
                    events.call_soon_threadsafe(on_load_error, state.error)

        state.loader = threading.Thread(target=load, name="mixtrt-load", daemon=True)
        state.loader.start()
        try:
            yield
        finally:
            state.closing = True
            if state.loop is not None:
                await asyncio.to_thread(state.loop.stop, settings.drain_s)

    # no redirect of "/v1/completions/" to the route without the slash: Starlette's would send the client's own Host
    # header back in its Location, unauthenticated (a 404, as for any unknown route)
    app = FastAPI(title="mixtrt", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None,
                  redirect_slashes=False)
    app.state.mixtrt_behind_proxy = behind_proxy
    if not behind_proxy:
        app.add_middleware(_RequestIds)
    if settings.allowed_origins:  # browsers' cross-origin requests (preflight OPTIONS included), as vLLM allows
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.allowed_origins), allow_methods=["*"],
                           allow_headers=["*"], allow_credentials=False)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        # a full queue clears as rows finish: a client may retry after about a second
        headers = {"Retry-After": "1"} if e.status == 429 else None
        if not e.logged:
            _log_refused(request, e)
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        # unknown routes (404), wrong methods (405): OpenAI's error object, not the framework's {"detail"}; OpenAI
        # types both an invalid_request_error ("Invalid URL (POST /v1/...)")
        message = f"{request.method} {request.url.path}: {e.detail}"
        error = ApiError(message, e.status_code)
        _log_refused(request, error)
        return JSONResponse(error.body(), status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.api_route("/health", methods=["GET", "HEAD"])  # HEAD: probes that read the status only
    @app.api_route("/ping", methods=["GET", "POST", "HEAD"])  # vLLM's (SageMaker's) name for it
    async def health(request: Request) -> JSONResponse:
        state: _State = request.app.state.mixtrt
        if state.loop is None:
            message = f"loading failed: {state.error}" if state.error else "Loading model"
            return JSONResponse(ApiError(message, 503, type="unavailable_error").body(), status_code=503)
        if not state.loop.accepting:
            return JSONResponse(ApiError("shutting down", 503, type="unavailable_error").body(), status_code=503)
        return JSONResponse({"status": "ok"})

    @app.api_route("/version", methods=["GET", "HEAD"])  # vLLM's: the server's version
    async def version() -> JSONResponse:
        from mixtrt import __version__

        return JSONResponse({"version": __version__})

    @app.api_route("/metrics", methods=["GET", "HEAD"])
    async def metrics(request: Request) -> Response:
        state: _State = request.app.state.mixtrt
        assert state.metrics is not None
        return Response(state.metrics.render(), media_type=state.metrics.content_type)

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(_check_key)])

    def model_card(request: Request) -> dict[str, Any]:
        """The one model's object, as /v1/models lists it."""
        state = _ready(request)
        assert state.loop is not None
        limit, _ = state.loop.engine.limit()
        return {"id": settings.name, "object": "model", "created": int(time.time()), "owned_by": "mixtrt",
                "root": settings.name, "parent": None, "max_model_len": limit}  # root, parent: vLLM's card

    @v1.api_route("/models", methods=["GET", "HEAD"])
    async def models(request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [model_card(request)]})

    @v1.api_route("/models/{model_id:path}", methods=["GET", "HEAD"])
    async def model(request: Request, model_id: str) -> JSONResponse:
        if not model_id:  # /v1/models/: the list (a client that joins paths with a slash)
            return await models(request)
        card = model_card(request)
        _check_model(model_id, settings.name)
        return JSONResponse(card)

    @v1.post("/completions")
    async def completions(request: Request) -> Response:
        return await _generate(request, CompletionRequest)

    @v1.post("/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _generate(request, ChatRequest)

    @v1.post("/responses")  # OpenAI's Responses API over the chat route (runtime/serve/responses.py)
    async def responses(request: Request) -> Response:
        state = _ready(request)
        raw = await _read_body(request, state.settings.max_body_bytes)
        # a big body is read off the event loop, as the chat route reads one (INLINE_BODY_BYTES)
        body, echoed = await asyncio.to_thread(_chat_body, raw) if len(raw) > INLINE_BODY_BYTES else _chat_body(raw)
        try:
            answer = await _generate(request, ChatRequest, body)
        except ApiError as e:
            raise responses_error(e) from None
        if isinstance(answer, StreamingResponse):
            return StreamingResponse(stream_events(answer.body_iterator, state.settings.name, echoed),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return JSONResponse(response_object(json.loads(bytes(answer.body)), echoed))

    app.include_router(v1)

    # vLLM's tokenizer endpoints (at the root, as vLLM serves them), behind the API key like /v1
    @app.post("/tokenize", dependencies=[Depends(_check_key)])
    async def tokenize(request: Request) -> JSONResponse:
        state = _ready(request)
        raw = await _read_body(request, settings.max_body_bytes)
        if len(raw) > INLINE_BODY_BYTES or _CONSTRAINED.search(raw):  # a forced tool_choice compiles a grammar
            return JSONResponse(await asyncio.to_thread(_tokenize, raw, state))
        return JSONResponse(_tokenize(raw, state))

    @app.post("/detokenize", dependencies=[Depends(_check_key)])
    async def detokenize(request: Request) -> JSONResponse:
        state = _ready(request)
        gen = state.generator
        assert gen is not None
        req = parse(DetokenizeRequest, _json_body(await _read_body(request, settings.max_body_bytes)))
        if req.model is not None:
            _check_model(req.model, settings.name)
        message = outside_vocab(req.tokens, gen.backend.args.vocab_size, "tokens: ids")
        if message:
            raise ApiError(message, param="tokens")
        if len(req.tokens) > HEAVY_ITEMS:  # a million ids decode for a good part of a second: not on the event loop
            return JSONResponse({"prompt": await asyncio.to_thread(gen.tokenizer.decode, req.tokens)})
        return JSONResponse({"prompt": gen.tokenizer.decode(req.tokens)})

    return app


def _json_body(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError as e:
        if "set_int_max_str_digits" in str(e):  # Python's own limit, worded for programmers
            e = ValueError(f"an integer of more than {sys.get_int_max_str_digits()} digits")
        raise ApiError(f"malformed JSON in the request body: {e}") from None
    except RecursionError:  # json's decoder recurses per nesting level
        raise ApiError("malformed JSON in the request body: nested too deeply") from None


def _chat_body(raw: bytes) -> tuple[bytes, dict[str, Any]]:
    """A Responses request's body -> (the chat completions body it runs as, JSON; what the Response echoes back)."""
    chat, echoed = to_chat(_json_body(raw))
    return json.dumps(chat).encode("utf-8"), echoed


def _tokenize(raw: bytes, state: _State) -> dict[str, Any]:
    """/tokenize: a prompt's ids (and pieces) as /v1/completions would prefill them, or chat messages' as
    /v1/chat/completions would; count and the model's length limit (vLLM's response)."""
    gen, loop = state.generator, state.loop
    assert gen is not None and loop is not None
    req = parse(TokenizeRequest, _json_body(raw))
    if req.model is not None:
        _check_model(req.model, state.settings.name)
    if (req.prompt is None) == (req.messages is None):
        raise ApiError("give either prompt (a text) or messages", param="prompt" if req.prompt is None else "messages")
    for name in ("tools", "tool_choice"):
        if getattr(req, name) is not None and req.messages is None:
            raise ApiError(f"{name}: for chat messages only (give messages, or leave {name} out)", param=name)
    try:
        if req.messages is not None:
            messages = chat_messages(req, getattr(gen.tokenizer, "takes_text_parts", False))
            check_messages_text(messages)
            check_continuation(req)
            offered, use = _offered_tools(req, gen)
            _forced_needs_a_reply(req, use)
            ids = chat_prompt(gen.tokenizer, messages, offered, use, req.tool_choice,
                              add_generation_prompt=req.add_generation_prompt,
                              continue_final_message=req.continue_final_message)
        else:
            ids = list(gen.tokenizer.encode(check_text(req.prompt or "", "prompt"), bos=req.add_special_tokens))
    except ConfigError as e:
        field = "messages" if req.messages is not None else "prompt"
        raise ApiError(f"{field}: {e}", param=field) from None
    return {"count": len(ids), "max_model_len": loop.engine.limit()[0], "tokens": ids,
            "token_strs": [gen.tokenizer.id_to_piece(i) for i in ids] if req.return_token_strs else None}


def _load(state: _State, generator: Generator | None, freeze_gc: bool = False, load_s: float = 0.0) -> None:
    s = state.settings
    start = time.perf_counter() - load_s
    try:
        gen = generator or s.load_generator()
        if state.closing:  # stopped while loading: nothing to serve
            return
        loop = EngineLoop(gen.backend, gen.tokenizer, s.max_batch, s.max_queue, state.metrics,
                          s.prefill_chunk or None)
    except Exception as e:  # any failure (ours, the OS's, onnxruntime's) is reported, not lost
        state.error = e
        log.error(json.dumps({"event": "load_failed", "artifact": str(s.artifact), "error": str(e)}))
        return
    state.generator, state.load_s = gen, time.perf_counter() - start
    state.texts = TokenTexts(gen.tokenizer)
    if freeze_gc:
        # what was loaded lives as long as the server: out of the collector's sight, a full collection (a stall of
        # every stream, the GIL held) scans only what requests made. Measured on the Mixtral-shaped benchmark
        # model: 30-40 ms per full collection over the ~70k objects loading leaves, ~0 after the freeze (vLLM
        # freezes its start-up heap the same way).
        gc.collect()
        gc.freeze()
    loop.start()
    state.loop = loop
    log.info(json.dumps({"event": "ready", "model": s.name, "artifact": str(s.artifact),
                         "load_s": round(state.load_s, 3), "max_batch": s.max_batch, "max_queue": s.max_queue,
                         "gc_frozen_objects": gc.get_freeze_count()}))


async def _check_key(request: Request) -> None:
    key = request.app.state.mixtrt.settings.api_key
    if key is None:
        return
    given = request.headers.get("authorization", "")
    token = given[7:] if given.lower().startswith("bearer ") else ""
    if not hmac.compare_digest(token.encode(), key.encode()):
        raise ApiError("invalid or missing API key (Authorization: Bearer KEY)", 401, type="authentication_error",
                       code="invalid_api_key")


def _ready(request: Request) -> _State:
    state: _State = request.app.state.mixtrt
    if state.loop is None:
        raise ApiError("the model is loading" if state.error is None else f"loading failed: {state.error}", 503,
                       type="unavailable_error")
    return state


BODY_IDLE_S = 30.0  # a request body's client sending nothing this long: 408 (uvicorn has no body timeout)
BODY_BUDGET_BODIES = 16  # request bodies read at once hold at most this many times --max-body-bytes: past it, 429


async def _read_body(request: Request, limit: int) -> bytes:
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding != "identity":  # a compressed body would otherwise be "malformed JSON"
        raise ApiError(f"Content-Encoding {encoding!r} is not supported: send the JSON body uncompressed", 415)
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise ApiError(f"the request body has {length} bytes, over the limit of {limit}", 413)
    state: _State = request.app.state.mixtrt
    budget = BODY_BUDGET_BODIES * limit
    chunks, size = [], 0
    stream = request.stream().__aiter__()
    try:
        while True:
            try:  # a client that stops sending its body holds its bytes: not for ever
                chunk = await asyncio.wait_for(stream.__anext__(), BODY_IDLE_S)
            except StopAsyncIteration:
                break
            except TimeoutError:
                raise ApiError(f"the request body stalled: no bytes for {BODY_IDLE_S:g} s after {size}", 408
                               ) from None
            if size + len(chunk) > limit:
                raise ApiError(f"the request body is over the limit of {limit} bytes", 413)
            if state.body_bytes + len(chunk) > budget:  # many partial bodies at once: memory, not one client
                raise ApiError(f"the server is reading {state.body_bytes} bytes of request bodies, its limit "
                               f"({BODY_BUDGET_BODIES} x --max-body-bytes): retry", 429, type="rate_limit_error",
                               code="rate_limit_exceeded")
            size += len(chunk)
            state.body_bytes += len(chunk)
            chunks.append(chunk)
    except ClientDisconnect:  # its line says so (status None: no response reaches it); the answer goes nowhere
        e = ApiError(f"the client disconnected after {size} bytes of its request body", 400, logged=True)
        _log_refused(request, e, answered=False)
        raise e from None
    finally:
        state.body_bytes -= size
    body = b"".join(chunks)
    # a body sent as something else (a form, XML) is named by its type, not called malformed JSON; JSON under another
    # type (curl -d without -H sends it as a form) is read as JSON, as llama-server does
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind and "json" not in kind and body.strip()[:1] not in (b"{", b"[", b""):
        raise ApiError(f"Content-Type {kind!r}: the request body must be JSON (Content-Type: application/json)", 415)
    return body


# ---- generation -------------------------------------------------------------------------------------

@dataclass
class _Call:
    """One generation request as the handlers see it."""

    kind: str  # "completions" / "chat"
    id: str
    req: CompletionRequest | ChatRequest
    prompts: list[list[int]]
    echo: list[str]  # per prompt, the text echoed before the completion ("" without echo)
    handle: EngineRequest
    t0: float
    created: int = field(default_factory=lambda: int(time.time()))
    t_first_sent: float | None = None
    outputs: dict[int, GenerationOutput] = field(default_factory=dict)
    status: int | None = 200  # the HTTP status the client got; None: it left before a response was sent
    end: str = "finished"  # or how it was cut short: disconnect / shutdown / error
    offsets: dict[int, TextOffsets] = field(default_factory=dict)  # per streamed choice with logprobs
    # echo with max_tokens 0 (completions): the engine makes one token, which the response leaves out
    echo_only: bool = False
    tools: ToolUse | None = None  # chat with tools shown: how the replies are read for calls
    endpoint: str = "chat"  # the route, as the log names it (/v1/responses runs as chat)


async def _generate(request: Request, model: type[CompletionRequest] | type[ChatRequest], raw: bytes | None = None
                    ) -> Response:
    """raw: the body to run (the Responses route's, read into a chat request), else the request's own."""
    state = _ready(request)
    s, gen, loop = state.settings, state.generator, state.loop
    assert gen is not None and loop is not None
    if raw is None:
        raw = await _read_body(request, s.max_body_bytes)
    # the request arrives once its body is in (vLLM's arrival time): a slow upload is the client's time, not the
    # server's queue or time to first token
    t0 = time.perf_counter()
    limits = loop.engine.limit()
    # parsing and tokenizing a big body would stall every stream, and so would compiling a schema: a thread
    if len(raw) > INLINE_BODY_BYTES or _CONSTRAINED.search(raw):
        req, prompts, echo, tools = await asyncio.to_thread(_prepare, raw, model, gen, limits, s)
    else:
        req, prompts, echo, tools = _prepare(raw, model, gen, limits, s)
    kind = "chat" if isinstance(req, ChatRequest) else "completions"
    limit = limits[0]
    try:
        # max_tokens left out: OpenAI's 16 for completions; for chat the artifact's max_new_tokens where its
        # generation_config.json sets one (as vLLM), else up to the model's limit
        default_max = 16 if kind == "completions" else gen.defaults.max_new_tokens or limit
        asked = overrides(req, default_max, gen.defaults.temperature)
        name, given = length_field(req)
        most, longest = asked["max_new_tokens"], max(len(p) for p in prompts)
        if req.min_tokens is not None and given is None and limit - longest < min(most, req.min_tokens):
            # a default length stops where the positions end (a given one past them was refused in _prepare)
            raise ApiError(f"min_tokens: {req.min_tokens} is more than the {limit - longest} tokens the request can "
                           f"generate: {name} is not given and the longest prompt ({longest} tokens) leaves "
                           f"{limit - longest} of the {limit} positions ({limits[1]})", param="min_tokens")
        if req.min_tokens is not None and req.min_tokens > most:  # as vLLM: not a silent cut
            raise ApiError(f"min_tokens: {req.min_tokens} is more than {name} "
                           f"({most}{'' if given is not None else ', the default'}), the most tokens the request "
                           "generates", param="min_tokens")
        # echo with max_tokens 0 scores the prompt (vLLM's echo without generation, OpenAI's legacy completions):
        # the prompt's logprobs come with its prefill, which also chooses a first token; that one is not returned
        if tools is not None and tools.call_forced:  # a forced call: its form and arguments held to; no content for
            asked.pop("json_schema", None)  # a response_format to shape (OpenAI's rule)
            if tools.grammar is not None:
                asked["grammar"] = tools.grammar
        echo_only = _scores_only(req)
        if echo_only:  # nothing is generated: no length, minimum or constraint to apply
            asked["max_new_tokens"] = 1
            for name in ("min_new_tokens", *STRUCTURED):
                asked.pop(name, None)
        config = gen.config(**asked)
        if isinstance(req, ChatRequest):  # "none": the tools shown, never called
            config = calls_suppressed(config, gen.tokenizer, req.tools, req.tool_choice)
    except ConfigError as e:
        raise _config_error(e, req) from None
    if req.stop_token_ids:  # vLLM's: beside the eos ids (none with ignore_eos), held back by min_tokens as they are
        message = outside_vocab(req.stop_token_ids, gen.backend.args.vocab_size, "stop_token_ids: ids")
        if message:
            raise ApiError(message, param="stop_token_ids")
        eos = config.eos_ids(gen.backend.args)
        config = dataclasses.replace(config, eos_token_id=eos + tuple(t for t in req.stop_token_ids if t not in eos))
    if echo_only:  # the one token its prefill chooses is not returned: it ends by length, as the response says
        config = dataclasses.replace(config, stop_strings=(), eos_token_id=())
    rid = _request_id(request)
    try:
        # a completion, and a continued chat message, is the text that continues the prompt's (a first word keeps
        # its leading space, as vLLM returns it)
        continued = kind == "completions" or getattr(req, "continue_final_message", False)
        handle = loop.submit(prompts, config, req.n, rid, t0, continuation=continued, stream=bool(req.stream),
                             score_only=echo_only)
    except QueueFull as e:
        raise ApiError(f"the server is busy: {e}", 429, type="rate_limit_error", code="rate_limit_exceeded") from None
    except NotAccepting as e:
        raise ApiError(str(e), 503, type="unavailable_error") from None
    call = _Call(kind, rid, req, prompts, echo, handle, t0, echo_only=echo_only, tools=tools,
                 endpoint=_endpoint(request))
    if req.stream:
        return StreamingResponse(_stream(call, state), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return await _complete(call, state, request)


async def _complete(call: _Call, state: _State, request: Request) -> Response:
    loop = state.loop
    assert loop is not None

    async def watch() -> None:  # a client that disconnects cancels its rows before the next step
        while (await request.receive())["type"] != "http.disconnect":
            pass
        loop.cancel(call.handle, "disconnect")

    watcher = asyncio.create_task(watch())
    abandoned = False
    try:
        async for event in call.handle.events():
            if event.output is not None:
                call.outputs[_choice(call, event)] = event.output
    except Cancelled as e:  # a disconnected client gets nothing: the log says so (status None)
        call.status, call.end = None if e.reason == "disconnect" else 503, e.reason
        raise ApiError(f"the request was cancelled ({e.reason})", 503, type="unavailable_error", logged=True
                       ) from None
    except BackendError as e:
        call.status, call.end = 500, "error"
        raise ApiError(str(e), 500, type="server_error", logged=True) from None
    except ConfigError as e:  # the engine refused a row the checks passed (a constraint compiled again): a 400
        call.status, call.end = 400, "error"
        raise ApiError(str(e), 400, logged=True) from None
    except asyncio.CancelledError:
        # the handler cancelled: under Ray Serve by its proxy when the client went away; else by uvicorn stopping
        # (a second Ctrl-C, its graceful timeout). Either way its rows go, logged once the engine has taken them out
        abandoned = True
        gone = request.app.state.mixtrt_behind_proxy and not state.forced
        call.status, call.end = (None, "disconnect") if gone else (503, "shutdown")
        loop.cancel(call.handle, call.end, then=lambda cut: _log_cancelled(call, cut))
        if gone:  # nobody is there to answer
            raise
        # answered as a drain past its deadline is (uvicorn would send a plain-text 500 for the cancelled handler)
        raise ApiError("the request was cancelled (shutdown)", 503, type="unavailable_error", logged=True) from None
    finally:
        watcher.cancel()
        if not abandoned:
            _log(call)
    def answer() -> JSONResponse:
        choices = [_full_choice(call, state, i) for i in range(call.handle.choices)]
        obj = "chat.completion" if call.kind == "chat" else "text_completion"
        return JSONResponse({"id": _id(call), "object": obj, "created": call.created, "model": state.settings.name,
                             "choices": choices, "usage": _usage(call)})

    # a big answer (many choices, logprobs of long texts: tens of MB of JSON) is built off the event loop, whose
    # streams it stalled for seconds
    return await asyncio.to_thread(answer) if _items(call) > HEAVY_ITEMS else answer()


async def _stream(call: _Call, state: _State) -> AsyncIterator[str]:
    loop = state.loop
    assert loop is not None
    name, chat = state.settings.name, call.kind == "chat"
    obj = "chat.completion.chunk" if chat else "text_completion"
    counts = [0] * call.handle.choices  # tokens seen per choice
    pending: list[list[int]] = [[] for _ in counts]  # token indices not yet sent (their text was held back)
    # with tools: per choice, its text held back while it writes a call (tool_calls.ToolStream)
    held = [ToolStream(call.tools, _tokenizer(state)) if call.tools is not None and chat else None for _ in counts]

    # every chunk is {"id", "object", "created", "model", "choices": [one choice]}: the constant part written once
    head = "data: " + _sse_json({"id": _id(call), "object": obj, "created": call.created, "model": name}
                                )[:-1] + ', "choices": ['

    options = call.req.stream_options
    usage = options is not None and options.include_usage
    running = options is not None and options.continuous_usage_stats  # vLLM's: usage so far in every chunk
    # with include_usage, the other chunks carry "usage": null (OpenAI's stream format)
    tail = "]}\n\n" if not usage or running else '], "usage": null}\n\n'
    prompt_tokens = sum(len(p) for p in call.prompts)

    # a client that takes no chunk for STALL_S while the stream has one for it is not reading: its rows are
    # cancelled and what waits for it dropped (the engine would otherwise make and keep its whole output)
    sending: list[float] = []  # when the chunk being sent was handed over (empty: the stream waits for the engine)
    stall = asyncio.create_task(_watch_stall(call, loop, sending))

    @contextlib.contextmanager
    def handing() -> Iterator[None]:
        """Around a yield: its chunk is being sent from now (the watchdog's clock) until the client took it."""
        sending.append(time.perf_counter())
        try:
            yield
        finally:
            sending.clear()

    # a long prompt's echo with logprobs (thousands of tokens x their alternatives, each choice's) is built off the
    # event loop, whose other streams it stalled for seconds
    heavy_echo = _items(call, prompt_only=True) > HEAVY_ITEMS

    async def echo_chunk(i: int, row: Any, finish: str | None) -> str:
        def build() -> str:
            return chunk({"index": i, "text": call.echo[i // call.req.n],
                          "logprobs": _echo_logprobs(call, state, i, row), "finish_reason": finish})

        return await asyncio.to_thread(build) if heavy_echo else build()

    def chunk(choice: dict[str, Any]) -> str:
        if running:
            return (head + _sse_json(choice) + '], "usage": '
                    + json.dumps(_usage_of(prompt_tokens, 0 if call.echo_only else sum(counts))) + "}\n\n")
        return head + _sse_json(choice) + tail

    # a chat choice's first chunk (its role) goes out with its first token, as vLLM sends it: sent before the
    # prefill, it was what clients timed as the first token (vLLM's benchmark client: TTFT 4-7x too low under load)
    roles = [chat] * len(counts)
    try:
        async for event in call.handle.events():
            i = _choice(call, event)
            row = event.row
            out = event.output
            parts = []
            if roles[i]:
                roles[i] = False
                parts.append(chunk({"index": i, "delta": {"role": "assistant", "content": call.echo[0]},
                                    "logprobs": None, "finish_reason": None}))
            if call.echo_only:  # one event per choice (its only token's): its echo, scored, and nothing generated
                assert out is not None
                call.outputs[i] = out
                scored = await echo_chunk(i, row, "length")
                with handing():
                    yield scored
                if call.t_first_sent is None:
                    call.t_first_sent = time.perf_counter()
                continue
            # the echo: its text, and with logprobs its tokens even where their text is empty (BOS alone)
            if counts[i] == 0 and _echoes(call) and (call.echo[i // call.req.n] or call.handle.config.return_logprobs):
                parts.append(await echo_chunk(i, row, None))
            pending[i].append(counts[i])
            counts[i] += 1
            if out is not None:
                call.outputs[i] = out
            tools = held[i]
            text = event.text if tools is None else tools.feed(event.token, event.text)
            reply = None
            if tools is not None and out is not None:
                rest, reply = tools.finish(out)
                text += rest
            if text or out is not None:
                lp = _stream_logprobs(call, state, row, pending[i])
                pending[i] = []
                finish = None if out is None else _finish(out)
                if chat:
                    delta: dict[str, Any] = {"content": text} if text else {}
                    if reply is not None:  # each call whole in one delta (OpenAI's clients join pieces by index)
                        delta["tool_calls"] = [{"index": n, **c.to_openai()} for n, c in enumerate(reply.calls)]
                        finish = "tool_calls"
                    if reply is not None and delta:  # the finish in a chunk of its own after the calls, as OpenAI
                        # sends it: the SDK's stream helper reads a chunk's finish_reason before its tool calls (the
                        # last call's arguments.done was never emitted); text ends with its finish, as vLLM's does
                        parts.append(chunk({"index": i, "delta": delta, "logprobs": lp, "finish_reason": None}))
                        delta, lp = {}, None
                    parts.append(chunk({"index": i, "delta": delta, "logprobs": lp, "finish_reason": finish}))
                else:
                    parts.append(chunk({"index": i, "text": text, "logprobs": lp, "finish_reason": finish}))
            for part in parts:
                with handing():
                    yield part
                if call.t_first_sent is None:
                    call.t_first_sent = time.perf_counter()  # the generator resumes once the chunk was sent
        if usage:
            yield "data: " + json.dumps({"id": _id(call), "object": obj, "created": call.created, "model": name,
                                         "choices": [], "usage": _usage(call)}) + "\n\n"
        yield "data: [DONE]\n\n"
    except Cancelled as e:  # the stream's status line (200) is out: the error goes in the stream
        call.end = e.reason
        yield "data: " + json.dumps(ApiError(f"the request was cancelled ({e.reason})", 503,
                                             type="unavailable_error").body()) + "\n\n"
        yield "data: [DONE]\n\n"  # as vLLM ends a stream after its error event: clients wait for it
    except BackendError as e:
        call.end = "error"
        yield "data: " + json.dumps(ApiError(str(e), 500, type="server_error").body()) + "\n\n"
        yield "data: [DONE]\n\n"
    except ConfigError as e:  # the engine refused a row the checks passed: the request's own error, in the stream
        call.end = "error"
        yield "data: " + json.dumps(ApiError(str(e), 400).body()) + "\n\n"
        yield "data: [DONE]\n\n"
    finally:
        stalled = stall.done() and not stall.cancelled()
        stall.cancel()
        if stalled:  # the watchdog cancelled the request: its log line is the watchdog's
            pass
        elif not call.handle.ended and len(call.outputs) < call.handle.choices:
            # the client went away, or the server's forced exit cut the stream (the response task was cancelled):
            # logged once the engine has taken the rows out, with the tokens they made until then (what the
            # metrics count)
            call.end = "shutdown" if state.forced else "disconnect"
            loop.cancel(call.handle, call.end, then=lambda cut: _log_cancelled(call, cut))
        else:
            if call.end == "finished" and len(call.outputs) < call.handle.choices:
                # ended by the engine (shutdown, an error) while the stream waited on a client not reading: the
                # item saying so is still in its queue
                call.end = _ended_by(call)
            _log(call)


STALL_S = 60.0  # a streamed chunk the client has not taken this long: it is not reading (nginx's send_timeout)
STALL_CHECK_S = 1.0


async def _watch_stall(call: _Call, loop: EngineLoop, sending: list[float]) -> None:
    """Cancel a stream whose client has not taken a chunk for STALL_S (`sending` holds when the chunk being sent was
    handed over): its rows leave the batch, and the events queued for it are dropped once the engine has taken the
    rows out (a request the engine had finished too: a client that reads nothing would hold its whole output; the
    metrics count that one finished), leaving the stream's end ("stalled"), which the client gets if it reads
    again. From then on the request's log line is this one's, written then with `end` "stalled": the stream's own
    end writes none."""
    while True:
        await asyncio.sleep(STALL_CHECK_S)
        if sending and time.perf_counter() - sending[0] > STALL_S:
            break

    def dropped(_cut: bool) -> None:
        _ended_by(call)  # empties the queue (the outputs in it counted for the log line)
        call.end = "stalled"
        call.handle.queue.put_nowait(Cancelled("stalled"))
        _log(call)

    loop.cancel(call.handle, "stalled", then=dropped)


# line breaks to Python's str.splitlines (and so to clients that split a stream with it, as httpx's iter_lines does)
# that JSON leaves unescaped: a token's text holding one would cut an event's line in two there
_RAW_BREAKS = {0x85: "\\u0085", 0x2028: "\\u2028", 0x2029: "\\u2029"}


def _sse_json(obj: Any) -> str:
    """json.dumps for an event's data line: UTF-8 as it is (ensure_ascii=False), the line breaks JSON leaves raw
    escaped (they can only be inside strings, where the escape is the same character)."""
    text = json.dumps(obj, ensure_ascii=False)
    if "\x85" in text or "\u2028" in text or "\u2029" in text:
        text = text.translate(_RAW_BREAKS)
    return text


def _ended_by(call: _Call) -> str:
    """How a request the engine ended, whose stream did not read all it was given, ended: from what its queue still
    holds (its outputs taken into call.outputs): the cancel's reason, "error", "finished" where every choice has
    its output (as the metrics count it), else "disconnect"."""
    end = None
    queue = call.handle.queue
    while not queue.empty():
        item = queue.get_nowait()
        if isinstance(item, Cancelled):
            end = item.reason
        elif isinstance(item, BaseException):
            end = "error"
        elif item.output is not None:
            call.outputs[_choice(call, item)] = item.output
    return end or ("finished" if len(call.outputs) == call.handle.choices else "disconnect")


def _log_cancelled(call: _Call, cut: bool) -> None:
    """The log line of a request whose response was abandoned, once the engine has taken its rows out. cut False:
    the engine had finished it before the cancel came (the metrics count it finished): the line says so, with the
    outputs its queue still holds."""
    _ended_by(call)  # the outputs its queue still holds: choices that finished before the cancel
    if not cut:
        call.end = "finished"
    _log(call)


# a body that asks for structured output or may force a tool call (its constraint compiled on the request's thread)
_CONSTRAINED = re.compile(rb'"(response_format|structured_outputs|guided_[a-z]+|json_schema|grammar|tool_choice)"|\\u')
INLINE_BODY_BYTES = 16 << 10  # a body up to this size is parsed and tokenized on the event loop (well under 10 ms)

# the runtime's GenerationConfig names -> the request field a client set them with
_PARAMS = {"max_new_tokens": "max_tokens", "stop_strings": "stop", "top_logprobs": "logprobs",
           "return_logprobs": "logprobs", "eos_token_id": "ignore_eos", "do_sample": "temperature",
           "min_new_tokens": "min_tokens"}


def _check_model(requested: str, served: str) -> None:
    """A 404 unless `requested` is the model this server serves."""
    if requested != served:
        raise ApiError(f"the model '{requested}' does not exist; this server serves '{served}'", 404, param="model",
                       code="model_not_found")


def _echoed(messages: list[dict[str, Any]]) -> str:
    """vLLM's chat echo: the last message's text where it is the assistant's (the reply continues it, or follows
    it), which the reply's content starts with; "" otherwise. Text parts are joined by newlines, as vLLM joins them."""
    last = messages[-1] if messages else {}
    if last.get("role") != "assistant" or not last.get("content"):
        return ""
    content = last["content"]
    return content if isinstance(content, str) else "\n".join(part["text"] for part in content)


def _prepare(raw: bytes, model: type[CompletionRequest] | type[ChatRequest], gen: Generator,
             limits: tuple[int, str], s: ServeSettings
             ) -> tuple[CompletionRequest | ChatRequest, list[list[int]], list[str], ToolUse | None]:
    """The request body checked and its prompts tokenized: (request, prompts' ids, text echoed per prompt, how
    its replies are read for tool calls). limits: the engine's (Engine.limit)."""
    req = parse(model, _json_body(raw))
    if req.model is not None:
        _check_model(req.model, s.name)
    field_name = "messages" if isinstance(req, ChatRequest) else "prompt"
    vocab = gen.backend.args.vocab_size
    tools = None
    try:
        if isinstance(req, ChatRequest):
            messages = chat_messages(req, getattr(gen.tokenizer, "takes_text_parts", False))
            check_messages_text(messages)
            offered, tools = _offered_tools(req, gen)
            _forced_needs_a_reply(req, tools)
            ids = chat_prompt(gen.tokenizer, messages, offered, tools, req.tool_choice,
                              add_generation_prompt=req.add_generation_prompt,
                              continue_final_message=req.continue_final_message)
            prompts = normalize_prompts([list(ids)], gen.tokenizer, vocab)
            echo = [_echoed(messages) if req.echo else ""]
            constraint = reply_constraint(req)
            if constraint is not None and tools is not None and tools.call_forced:
                if constraint[1] != "json_schema":  # a JSON reply's form yields to the call (OpenAI's rule)
                    raise ApiError(f"tool_choice: {json.dumps(req.tool_choice)} asks for a call, and {constraint[0]} "
                                   "for a reply of its own form: give one of them", param=constraint[0].split(".")[0])
                constraint = None
        else:
            prompts = normalize_prompts(req.prompt, gen.tokenizer, vocab)
            texts = req.prompt if isinstance(req.prompt, list) and req.prompt and isinstance(req.prompt[0], str) \
                else [req.prompt] if isinstance(req.prompt, str) else None
            echo = [(texts[i] if texts else gen.tokenizer.decode(p)) if req.echo else "" for i, p in enumerate(prompts)]
            constraint = reply_constraint(req)
    except ConfigError as e:
        raise ApiError(f"{field_name}: {e}", param=field_name) from None
    limit, why = limits
    name, asked = length_field(req)
    score_only = _scores_only(req)  # adds no token: may fill the positions
    for i, p in enumerate(prompts):
        if len(p) > limit or (len(p) == limit and not score_only):
            raise ApiError(f"{field_name}: prompt {i} has {len(p)} tokens, "
                           + (f"more than the {limit} the model holds" if len(p) > limit else
                              "which leaves no room for a new token") + f": {why}", param=field_name)
        if asked is not None and len(p) + asked > limit:  # as vLLM and OpenAI answer, not a silent cut
            raise ApiError(f"{name}: prompt {i} has {len(p)} tokens and {name} asks for {asked} more, past the "
                           f"{limit} the model holds ({why}); ask for at most {limit - len(p)}", param=name)
    if len(prompts) * req.n > s.max_batch + s.max_queue:  # named by what the client made many: n, or its prompts
        param = "n" if req.n > 1 else field_name
        raise ApiError(f"{param}: {len(prompts)} prompt(s) x n={req.n} choices is more than the server holds "
                       f"({s.max_batch} running + {s.max_queue} waiting rows: --max-batch, --max-queue); send "
                       "fewer at a time", param=param)
    # last: a request the checks above refuse costs no compile
    if constraint is not None:  # compiled here, not on the engine loop (each row copies it)
        from mixtrt.runtime.structured import constraint_text, prepare

        try:
            # a completion's text continues the prompt's (no dummy-prefix space to drop in front)
            prepare(gen.tokenizer, (constraint[1], constraint_text(constraint[1], constraint[2])),
                    new_message=isinstance(req, ChatRequest))
        except ConfigError as e:
            raise ApiError(str(e).replace(constraint[1], constraint[0], 1), param=constraint[0].split(".")[0]
                           ) from None
    if tools is not None and tools.call_forced and tools.grammar is not None:  # a forced call's grammar: the same
        from mixtrt.runtime.structured import prepare

        try:
            prepare(gen.tokenizer, ("grammar", tools.grammar))
        except ConfigError as e:
            choice = json.dumps(getattr(req, "tool_choice", None))
            raise ApiError(f"tools: the call tool_choice {choice} asks for cannot be enforced over these tools: {e}",
                           param="tools") from None
    return req, prompts, echo, tools


def _forced_needs_a_reply(req: ChatRequest | TokenizeRequest, use: ToolUse | None) -> None:
    """A forced tool_choice starts the assistant's reply: a 400 where the request leaves the reply out."""
    if use is not None and use.call_forced and (not req.add_generation_prompt or req.continue_final_message):
        raise ApiError(f"tool_choice: {json.dumps(req.tool_choice)} starts the assistant's reply, which "
                       "add_generation_prompt false / continue_final_message leave out", param="tool_choice")


def _offered_tools(req: ChatRequest | TokenizeRequest, gen: Generator
                   ) -> tuple[list[dict[str, Any]] | None, ToolUse | None]:
    """(the tools the prompt shows, how its replies are read): runtime/tool_calls.py `tool_use`, its errors as
    400s naming tools or tool_choice."""
    try:
        return tool_use(gen.tokenizer, req.tools, getattr(req, "tool_choice", None),
                        getattr(req, "parallel_tool_calls", None) is not False)
    except ConfigError as e:
        message = str(e)
        raise ApiError(message, param="tool_choice" if message.startswith("tool_choice") else "tools") from None




def _config_error(e: ConfigError, req: CompletionRequest | ChatRequest) -> ApiError:
    """A GenerationConfig error in the client's terms: the request field it came from named, as `param` too."""
    message = str(e)
    name = message.split(" ", 1)[0].split("[", 1)[0].rstrip(":")
    if name in STRUCTURED:  # named as the request asked for it: a forced call's grammar is the tool_choice's
        forced = isinstance(req, ChatRequest) and req.tools and req.tool_choice not in (None, "auto", "none")
        asked = None if forced and name == "grammar" else reply_constraint(req)
        where = "tool_choice" if asked is None else asked[0]
        return ApiError(message.replace(name, where, 1), param=where.split(".")[0])
    if name not in _PARAMS and name not in type(req).model_fields:
        return ApiError(message)
    param = _PARAMS.get(name, name)
    if param == "logprobs" and isinstance(req, ChatRequest) and name == "top_logprobs":
        param = "top_logprobs"
    if param == "max_tokens":
        param = length_field(req)[0]
    return ApiError(message.replace(name, param, 1), param=param)


# ---- response pieces ----------------------------------------------------------------------------------

def _id(call: _Call) -> str:
    return ("chatcmpl-" if call.kind == "chat" else "cmpl-") + call.id


def _choice(call: _Call, event: EngineEvent) -> int:
    return call.handle.rows.index(event.row)


def _finish(out: GenerationOutput) -> str:
    return "length" if out.finish_reason == "length" else "stop"


def _usage(call: _Call) -> dict[str, int]:
    return _usage_of(sum(len(p) for p in call.prompts),
                     0 if call.echo_only else sum(len(o.token_ids) for o in call.outputs.values()))


def _usage_of(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _full_choice(call: _Call, state: _State, i: int) -> dict[str, Any]:
    out = call.outputs[i]
    p = i // call.req.n
    if call.kind == "chat":
        row = call.handle.rows[i]
        lp = chat_logprobs(_texts(state), out.token_ids, out.logprobs, out.top_logprobs, _chat_k(call), row.front,
                           row.new_message) if out.logprobs is not None else None
        echo = call.echo[0]
        if call.tools is None:
            return {"index": i, "message": {"role": "assistant", "content": echo + out.text}, "logprobs": lp,
                    "finish_reason": _finish(out)}
        tokenizer = _tokenizer(state)
        reply = call.tools.reply(out, tokenizer)
        if reply is None:
            return {"index": i, "message": {"role": "assistant", "content": echo + call.tools.text(out, tokenizer)},
                    "logprobs": lp, "finish_reason": _finish(out)}
        # OpenAI's form: content is the text before the calls (null when none)
        return {"index": i, "message": {"role": "assistant", "content": echo + (reply.content or "") or None,
                                        "tool_calls": [c.to_openai() for c in reply.calls]},
                "logprobs": lp, "finish_reason": "tool_calls"}
    lp = None
    if call.echo_only:
        if out.logprobs is not None:
            lp = prompt_logprobs(_texts(state), call.prompts[p], out.prompt_logprobs, out.prompt_top_logprobs,
                                 call.req.logprobs or 0)
        return {"index": i, "text": call.echo[p], "logprobs": lp, "finish_reason": "length"}
    if out.logprobs is not None:
        k = call.req.logprobs or 0
        offsets = _text_offsets(call, state, i)(out.token_ids)
        gen_lp = completion_logprobs(_texts(state), out.token_ids, list(out.logprobs), out.top_logprobs, k, offsets)
        lp = merge(prompt_logprobs(_texts(state), call.prompts[p], out.prompt_logprobs, out.prompt_top_logprobs, k),
                    gen_lp) if _echoes(call) else gen_lp
    return {"index": i, "text": call.echo[p] + out.text, "logprobs": lp, "finish_reason": _finish(out)}


HEAVY_ITEMS = 50_000  # tokens (x alternatives with logprobs) an answer may hold and still be built on the event loop


def _items(call: _Call, prompt_only: bool = False) -> int:
    """The tokens (each with its logprob alternatives) a request's answer writes: what building it costs."""
    per = 1 + (call.handle.config.top_logprobs or 0) if call.handle.config.return_logprobs else 1
    echoed = sum(len(p) for p in call.prompts) * call.req.n if _echoes(call) else 0
    if prompt_only:
        return echoed * per
    return (echoed + sum(len(out.token_ids) for out in call.outputs.values())) * per


def _echo_logprobs(call: _Call, state: _State, i: int, row: Any) -> dict[str, Any] | None:
    if not call.handle.config.return_logprobs:
        return None
    return prompt_logprobs(_texts(state), call.prompts[i // call.req.n], row.prompt_logprobs, row.prompt_top,
                            call.req.logprobs or 0)


def _stream_logprobs(call: _Call, state: _State, row: Any, indices: list[int]) -> dict[str, Any] | None:
    """Logprobs of a row's tokens at `indices` (read from the row: the engine only appends to its lists)."""
    if not call.handle.config.return_logprobs:
        return None
    ids = [row.tokens[t] for t in indices]
    lps = [row.logprobs[t] for t in indices]
    top = None
    if row.top:
        top = (np.stack([row.top[t][0] for t in indices]), np.stack([row.top[t][1] for t in indices]))
    if call.kind == "chat":  # the message's front is taken off the first tokens, which come in its first chunk
        first = indices[:1] == [0]
        return chat_logprobs(_texts(state), ids, lps, top, _chat_k(call), row.front if first else "",
                             first and row.new_message)
    i = call.handle.rows.index(row)
    if i not in call.offsets:  # one per streamed choice: its chunks' offsets go on from the last one's
        call.offsets[i] = _text_offsets(call, state, i)
    return completion_logprobs(_texts(state), ids, lps, top, call.req.logprobs or 0, call.offsets[i](ids))


def _text_offsets(call: _Call, state: _State, i: int) -> TextOffsets:
    """Offsets of choice i's generated tokens in its returned text: after its prompt's echo (if any)."""
    p = i // call.req.n
    return TextOffsets(_texts(state).tokenizer, call.prompts[p], len(call.echo[p]))


def _chat_k(call: _Call) -> int:
    return (call.req.top_logprobs or 0) if isinstance(call.req, ChatRequest) else 0


def _tokenizer(state: _State) -> Any:
    assert state.generator is not None
    return state.generator.tokenizer


def _texts(state: _State) -> TokenTexts:
    assert state.texts is not None
    return state.texts


def _echoes(call: _Call) -> bool:
    """A completion that returns its prompt (echo) before what it generates: text and, with logprobs, tokens."""
    return isinstance(call.req, CompletionRequest) and call.req.echo


def _scores_only(req: CompletionRequest | ChatRequest) -> bool:
    """Echo with max_tokens 0 (completions; parse refuses max_tokens 0 elsewhere): the prompt scored, nothing
    generated."""
    return isinstance(req, CompletionRequest) and req.echo and length_field(req)[1] == 0


class _RequestIds:
    """ASGI middleware: every HTTP response carries its request's X-Request-Id (the id `_request_id` gives its log
    line), whatever route answers it. Plain ASGI, not Starlette's BaseHTTPMiddleware, which would wrap every
    streamed response and hide a client's disconnect."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = _request_id(Request(scope)).encode("latin-1")

        async def send_with_id(message: Any) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                message = {**message, "headers": [*headers, (b"x-request-id", rid)]}
            await send(message)

        await self.app(scope, receive, send_with_id)


def _request_id(request: Request) -> str:
    """The request's id, the same for its log line and its response's X-Request-Id, answered or refused: the
    client's X-Request-Id (a load balancer's, to join its logs with ours; vLLM takes it as its request id) where it
    is 1-128 visible ASCII characters, else a fresh one."""
    rid = getattr(request.state, "mixtrt_request_id", None)
    if rid is None:
        given = request.headers.get("x-request-id", "")
        if request.app.state.mixtrt_behind_proxy:  # the id the proxy answers with
            rid = given or uuid.uuid4().hex
        else:
            rid = given if 0 < len(given) <= 128 and given.isascii() and given.isprintable() and " " not in given \
                else uuid.uuid4().hex
        request.state.mixtrt_request_id = rid
    return rid


def _log_refused(request: Request, e: ApiError, answered: bool = True) -> None:
    """The log line of a request answered with an error before it reached the engine (4xx, a 503 while loading):
    its route, status and the error's message. answered False: the client left before any answer (status None;
    not counted in the metrics' refused requests, which count answers)."""
    endpoint = _endpoint(request)
    status = e.status if answered else None
    state = getattr(request.app.state, "mixtrt", None)
    if state is not None and state.metrics is not None and status is not None:
        state.metrics.refused(status)
    log.info(json.dumps({"event": "refused", "id": _request_id(request), "endpoint": endpoint,
                         "method": request.method, "status": status, "error": str(e)}))


def _endpoint(request: Request) -> str:
    """The route's name in the log lines: completions, chat, responses, or its path."""
    path = request.url.path.rstrip("/")
    return {"/v1/completions": "completions", "/v1/chat/completions": "chat", "/v1/responses": "responses"
            }.get(path, path)


def _log(call: _Call) -> None:
    rows = call.handle.rows
    first = rows[0] if rows else None
    prefill = first.t_prefill if first is not None and first.tokens else None
    ttft = first.t_first - call.t0 if first is not None and first.tokens else None
    queue = first.queue_s if first is not None and first.tokens else None
    sent = call.t_first_sent - call.t0 if call.t_first_sent is not None else None
    record = {
        "event": "request", "id": call.id, "endpoint": call.endpoint, "status": call.status, "end": call.end,
        "stream": call.req.stream, "n": call.handle.choices, "prompt_tokens": sum(len(p) for p in call.prompts),
        "completion_tokens": 0 if call.echo_only else sum(len(r.tokens) for r in rows),
        "finish": [_finish(call.outputs[i]) if i in call.outputs else None for i in range(call.handle.choices)],
        "queue_s": queue, "prefill_s": prefill, "ttft_s": ttft, "first_sent_s": sent,
        # what the server adds before the first token reaches the socket, the engine's prefill aside
        "overhead_s": sent - prefill if sent is not None and prefill is not None else None,
        "e2e_s": time.perf_counter() - call.t0,
    }
    log.info(json.dumps({k: round(v, 6) if isinstance(v, float) else v for k, v in record.items()}))
