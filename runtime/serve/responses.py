"""OpenAI's Responses API (`POST /v1/responses`, what the openai-agents SDK and pydantic-ai's `OpenAIResponsesModel`
call) over the chat route: a request is read into a chat completions body (`to_chat`), runs as one, and its answer
is written back as a Response object (`response_object`) or, streamed, as the Responses API's typed events
(`ResponseEvents`). Nothing is stored: `previous_response_id` and `conversation` are refused (send the whole
conversation as `input`), `store` is accepted and has no effect.

    >>> body, _ = to_chat({"input": "Hi", "instructions": "Be brief.", "max_output_tokens": 8})
    >>> body["messages"], body["max_tokens"]
    ([{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'Hi'}], 8)
"""

from __future__ import annotations

import json
import re
import secrets
import time
from collections.abc import AsyncIterable, AsyncIterator
from typing import Any

from mixtrt.runtime.errors import ConfigError
from mixtrt.runtime.prompts import check_strings
from mixtrt.runtime.serve.protocol import ApiError

# fields taken over as they are (the chat route checks them): OpenAI's, and the sampling extras vLLM takes
_SAME = ("model", "temperature", "top_p", "parallel_tool_calls", "user", "top_k", "min_p", "seed",
         "repetition_penalty", "presence_penalty", "frequency_penalty", "service_tier")
# accepted with no effect: nothing is stored, no cache key or caller id to act on
_IGNORED = ("store", "metadata", "prompt_cache_key", "prompt_cache_retention", "safety_identifier")
# chat fields an error may name -> the Responses field they came from; and the paths in its message
_FIELDS = {"max_tokens": "max_output_tokens", "max_completion_tokens": "max_output_tokens", "messages": "input",
           "response_format": "text"}
_PATHS = ((re.compile(r"\b(max_tokens|max_completion_tokens)\b"), "max_output_tokens"),
          (re.compile(r"^response_format(\.json_schema)?\b"), "text.format"),
          (re.compile(r"^tools(\[\d+\])\.function\b"), r"tools\1"))


def _error(message: str, param: str) -> ApiError:
    return ApiError(f"{param}: {message}", param=param.split(".")[0].split("[")[0])


def to_chat(body: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the chat completions body a Responses request runs as, what the Response object echoes back: instructions,
    tools, tool_choice, ...); an ApiError naming the field for one the server does not take."""
    if not isinstance(body, dict):
        raise ApiError(f"the body must be a JSON object, got {type(body).__name__}")
    body = {k: v for k, v in body.items() if v is not None}  # null is a field left out, as on the other routes
    chat: dict[str, Any] = {k: body[k] for k in _SAME if k in body}
    for name in ("previous_response_id", "conversation"):
        if name in body:
            raise _error("the server stores no responses: send the whole conversation as input", name)
    if body.get("background", False) is not False:
        raise _error("background responses are not served (the server stores no responses)", "background")
    if body.get("truncation", "disabled") != "disabled":
        raise _error('only "disabled" is served: a conversation past the context is a 400', "truncation")
    reasoning = body.get("reasoning", {})
    if not isinstance(reasoning, dict) or any(v is not None for v in reasoning.values()):
        raise _error("the model has no reasoning to configure (leave it out, or null)", "reasoning")
    include = body.get("include", [])
    if not isinstance(include, list) or include:
        raise _error(f"{json.dumps(include)[:80]} cannot be included: the server adds nothing to a response", "include")
    metadata = body.get("metadata", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _error("must be an object of strings", "metadata")
    # echoed in the Response, written as UTF-8, which a lone surrogate is not
    for name in ("metadata", "user", "text", "tool_choice"):
        try:
            check_strings(body.get(name), name)
        except ConfigError as e:
            raise ApiError(str(e), param=name) from None
    if body.get("top_logprobs"):
        raise _error("logprobs are served on /v1/chat/completions and /v1/completions", "top_logprobs")
    known = {*_SAME, *_IGNORED, "input", "instructions", "max_output_tokens", "stream", "stream_options", "tools",
             "tool_choice", "text", "previous_response_id", "conversation", "background", "truncation", "reasoning",
             "include", "top_logprobs", "max_tool_calls"}
    for name in body:
        if name not in known:
            raise ApiError(f"unknown field {name!r}", param=name)
    messages = []
    if "instructions" in body:
        if not isinstance(body["instructions"], str):
            raise _error("must be a string", "instructions")
        messages.append({"role": "system", "content": body["instructions"]})
    if "input" not in body:
        raise _error("is required (a string, or a list of input items)", "input")
    messages += _messages(body["input"])
    if not messages:
        raise _error("holds no message (reasoning items are dropped)", "input")
    chat["messages"] = messages
    if messages[-1]["role"] == "assistant" and not messages[-1].get("tool_calls"):
        # a reply cannot follow a reply in Mistral's formats: the last one is continued (vLLM's Mistral path)
        chat.update(add_generation_prompt=False, continue_final_message=True)
    if "max_output_tokens" in body:
        chat["max_tokens"] = body["max_output_tokens"]
    if "max_tool_calls" in body:  # 1 is one call (parallel_tool_calls false); no other bound can be held to
        if type(body["max_tool_calls"]) is not int or body["max_tool_calls"] != 1:
            raise _error(f"only 1 is served (one call, as parallel_tool_calls false), got "
                         f"{json.dumps(body['max_tool_calls'])[:40]}; leave it out for any number", "max_tool_calls")
        chat["parallel_tool_calls"] = False
    tools = body.get("tools")
    if tools is not None:
        chat["tools"] = _tools(tools)
    choice = body.get("tool_choice")
    if choice is not None:
        chat["tool_choice"] = _tool_choice(choice)
    text = body.get("text")
    if text is not None:
        chat.update(_text_format(text))
    stream = body.get("stream", False)
    chat["stream"] = stream
    if stream:
        chat["stream_options"] = {"include_usage": True}
    elif "stream_options" in body:
        raise _error("is only for stream true", "stream_options")
    echoed = {"instructions": body.get("instructions"), "tools": tools or [], "tool_choice": choice or "auto",
              "parallel_tool_calls": body.get("parallel_tool_calls", True), "temperature": body.get("temperature"),
              "top_p": body.get("top_p"), "max_output_tokens": body.get("max_output_tokens"),
              "metadata": body.get("metadata") or {}, "text": text or {"format": {"type": "text"}},
              "store": False, "user": body.get("user")}
    return chat, echoed


def _messages(items: Any) -> list[dict[str, Any]]:
    """Responses input -> chat messages: a string is one user message; each item a message (roles user, system,
    developer = system, assistant), a function_call (an assistant message's tool call; consecutive ones one
    message) or a function_call_output (a tool message); reasoning items are dropped."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    if not isinstance(items, list) or not items:
        raise _error("must be a string or a non-empty list of input items", "input")
    out: list[dict[str, Any]] = []
    calls: set[str] = set()  # the call ids so far: an output answers one of them
    for n, item in enumerate(items):
        at = f"input[{n}]"
        if not isinstance(item, dict):
            raise _error(f"must be an object, got {type(item).__name__}", at)
        kind = _kind(item)
        _only(item, _ITEM_FIELDS.get(kind), at)
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise _error(f"role must be user, system, developer or assistant, got {role!r}", f"{at}.role")
            out.append({"role": "system" if role == "developer" else role,
                        "content": _content(item.get("content"), f"{at}.content")})
        elif kind == "function_call":
            calls.add(_string(item, "call_id", at))
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": _string(item, "name", at), "arguments": _string(item, "arguments", at)}}
            # the calls of one reply follow its message item (its text before them): one assistant message, as
            # the chat route takes a reply back; consecutive calls join it too
            if out and out[-1]["role"] == "assistant" and (out[-1].get("tool_calls") or n and _kind(items[n - 1])
                                                           == "message"):
                out[-1].setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            call_id = _string(item, "call_id", at)
            if call_id not in calls:
                raise _error(f"no function_call with call_id {call_id!r} comes before this output", f"{at}.call_id")
            output = item.get("output")
            text = output if isinstance(output, str) else _content(output, f"{at}.output")
            out.append({"role": "tool", "tool_call_id": call_id, "content": text})
        elif kind == "reasoning":
            continue
        else:
            raise _error(f"items of type {kind!r} are not served (message, function_call, function_call_output)",
                         f"{at}.type")
    return out


# the fields OpenAI's input items and content parts have (an item fed back from a response keeps its id, status,
# annotations, logprobs): any other is refused by name, as OpenAI refuses it and this route does at its top level
_ITEM_FIELDS = {"message": {"type", "role", "content", "id", "status"},
                "function_call": {"type", "id", "call_id", "name", "arguments", "status"},
                "function_call_output": {"type", "id", "call_id", "output", "status"}}
_PART_FIELDS = {"input_text": {"type", "text"}, "text": {"type", "text"},
                "output_text": {"type", "text", "annotations", "logprobs"}, "refusal": {"type", "refusal"}}


def _only(obj: dict[str, Any], known: set[str] | None, at: str) -> None:
    """A 400 naming the first field of `obj` not among `known` (None: the kind's own check says what is wrong)."""
    unknown = sorted(set(obj) - known) if known is not None else []
    if unknown:
        raise _error(f"unknown field {unknown[0]!r}", f"{at}.{unknown[0]}")


def _kind(item: Any) -> Any:
    return item.get("type", "message") if isinstance(item, dict) else None


def _string(item: dict[str, Any], key: str, at: str) -> str:
    value = item.get(key)
    if not isinstance(value, str):
        raise _error(f"must be a string, got {type(value).__name__}", f"{at}.{key}")
    return value


def _content(content: Any, at: str) -> str | list[dict[str, str]]:
    """A message's content: a string, or its text parts (input_text, output_text; refusals) as chat's text parts,
    which the chat route joins as the chat format does."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _error("must be a string or a list of content parts", at)
    parts = []
    for n, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if isinstance(part, dict) and isinstance(kind, str):
            _only(part, _PART_FIELDS.get(kind), f"{at}[{n}]")
        if kind in ("input_text", "output_text", "text") and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "refusal" and isinstance(part.get("refusal"), str):
            parts.append({"type": "text", "text": part["refusal"]})
        else:
            raise _error(f"a part of type {kind!r} is not served: the model reads text (input_text)", f"{at}[{n}]")
    return parts


def _tools(tools: Any) -> list[dict[str, Any]]:
    """Responses function tools ({"type": "function", "name", "description"?, "parameters"?, "strict"?}) -> chat's."""
    if not isinstance(tools, list):
        raise _error("must be a list of function tools", "tools")
    out = []
    for n, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            kind = tool.get("type") if isinstance(tool, dict) else type(tool).__name__
            raise _error(f"only function tools are served, got {kind!r}", f"tools[{n}]")
        unknown = set(tool) - {"type", "name", "description", "parameters", "strict"}
        if unknown:
            raise _error(f"unknown field {sorted(unknown)[0]!r}", f"tools[{n}]")
        out.append({"type": "function", "function": {k: tool[k] for k in ("name", "description", "parameters",
                                                                           "strict") if tool.get(k) is not None}})
    return out


def _tool_choice(choice: Any) -> Any:
    """"auto" / "none" / "required" as they are; {"type": "function", "name"} -> chat's named form."""
    if choice in ("auto", "none", "required"):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise _error(f'must be "auto", "none", "required" or {{"type": "function", "name": ...}}, got '
                 f"{json.dumps(choice, default=repr)}", "tool_choice")


def _text_format(text: Any) -> dict[str, Any]:
    """text.format -> chat's response_format: text (none; the default), json_object, json_schema {name, schema,
    strict}; `verbosity` is accepted (a model's own setting: none here)."""
    if not isinstance(text, dict) or set(text) - {"format", "verbosity"}:
        raise _error('must be {"format": {...}, "verbosity"?: ...}', "text")
    fmt = text.get("format") or {"type": "text"}
    if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
        raise _error('must be {"format": {"type": "text" | "json_object" | "json_schema", ...}}', "text.format")
    if fmt["type"] == "text":
        return {}
    if fmt["type"] == "json_object":
        return {"response_format": {"type": "json_object"}}
    _only(fmt, {"type", "name", "schema", "strict", "description"}, "text.format")
    schema = {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}
    return {"response_format": {"type": "json_schema", "json_schema": schema}}


def responses_error(e: ApiError) -> ApiError:
    """An error of the chat route naming a chat field, named by the Responses field it came from."""
    message = str(e)
    for path, name in _PATHS:
        message = path.sub(name, message)
    field = _FIELDS.get(e.param or "", e.param)
    if (field, message) == (e.param, str(e)):
        return e
    return ApiError(message, e.status, field, e.type, e.code, e.logged)


def _new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(16)}"


def _usage(usage: dict[str, int] | None) -> dict[str, Any] | None:
    if usage is None:
        return None
    return {"input_tokens": usage["prompt_tokens"],
            "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": usage["completion_tokens"], "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": usage["total_tokens"]}


def _message_item(text: str, item_id: str, status: str = "completed") -> dict[str, Any]:
    return {"type": "message", "id": item_id, "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}


def _call_item(call: dict[str, Any], item_id: str, status: str = "completed") -> dict[str, Any]:
    return {"type": "function_call", "id": item_id, "call_id": call["id"], "name": call["function"]["name"],
            "arguments": call["function"]["arguments"], "status": status}


def _ended(finish: str | None) -> str:
    """The status of a response (and of its message) that ended with the chat reply's finish_reason: incomplete
    where the length cut it."""
    return "incomplete" if finish == "length" else "completed"


def _shell(response_id: str, created: float, model: str, echoed: dict[str, Any], status: str,
           output: list[dict[str, Any]], usage: dict[str, Any] | None, finish: str | None) -> dict[str, Any]:
    """The Response object (status: "in_progress" / "failed", or "completed", which a cut reply makes incomplete)."""
    if status == "completed":
        status = _ended(finish)
    incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
    # an integer, as OpenAI sends it (a float's "….0" failed clients typing it int64)
    return {"id": response_id, "object": "response", "created_at": int(created), "model": model, "status": status,
            "error": None, "incomplete_details": incomplete, "output": output, "usage": usage, **echoed}


def response_object(chat: dict[str, Any], echoed: dict[str, Any]) -> dict[str, Any]:
    """A chat completion (one choice) as the Response object: the message's text as an output_text item (where
    it has any), each tool call as a function_call item."""
    [choice] = chat["choices"]
    message = choice["message"]
    output = []
    if message.get("content"):
        output.append(_message_item(message["content"], _new_id("msg"), _ended(choice["finish_reason"])))
    for call in message.get("tool_calls") or ():
        output.append(_call_item(call, _new_id("fc")))
    return _shell(_new_id("resp"), float(chat["created"]), chat["model"], echoed, "completed", output,
                  _usage(chat.get("usage")), choice["finish_reason"])


class ResponseEvents:
    """The chat route's stream (its `data: {chunk}` lines, with usage last) as the Responses API's events:
    response.created / in_progress, then for the message output_item.added, content_part.added, output_text.delta
    per chunk of text, output_text.done, content_part.done, output_item.done; each tool call as a function_call item
    (added, its arguments in one delta, done); then response.completed (or response.incomplete when
    max_output_tokens cut it). Each event has its sequence_number."""

    def __init__(self, model: str, echoed: dict[str, Any]) -> None:
        self.model, self.echoed = model, echoed
        self.id, self.created = _new_id("resp"), float(int(time.time()))
        self.seq = 0
        self.output: list[dict[str, Any]] = []
        self.text: list[str] | None = None  # the message's text so far, once its item is open
        self.message_id = _new_id("msg")
        self.finish: str | None = None

    def _event(self, kind: str, **fields: Any) -> str:
        event = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return f"event: {kind}\ndata: {json.dumps(event, ensure_ascii=False)}\n\n"

    def _response(self, status: str, usage: dict[str, Any] | None = None) -> dict[str, Any]:
        return _shell(self.id, self.created, self.model, self.echoed, status, self.output, usage, self.finish)

    def start(self) -> list[str]:
        return [self._event("response.created", response=self._response("in_progress")),
                self._event("response.in_progress", response=self._response("in_progress"))]

    def _open_message(self) -> list[str]:
        self.text = []
        index = len(self.output)
        return [self._event("response.output_item.added", output_index=index,
                            item={**_message_item("", self.message_id, "in_progress"), "content": []}),
                self._event("response.content_part.added", item_id=self.message_id, output_index=index,
                            content_index=0, part={"type": "output_text", "text": "", "annotations": [],
                                                   "logprobs": []})]

    def _close_message(self) -> list[str]:
        if self.text is None:
            return []
        text, index = "".join(self.text), len(self.output)
        item = _message_item(text, self.message_id, _ended(self.finish))
        self.output.append(item)
        self.text = None
        return [self._event("response.output_text.done", item_id=self.message_id, output_index=index,
                            content_index=0, text=text, logprobs=[]),
                self._event("response.content_part.done", item_id=self.message_id, output_index=index,
                            content_index=0, part=item["content"][0]),
                self._event("response.output_item.done", output_index=index, item=item)]

    def feed(self, line: str) -> list[str]:
        """The events for one line of the chat stream ("data: {...}" or "data: [DONE]"; others are skipped)."""
        if not line.startswith("data: ") or line.startswith("data: [DONE]"):
            return []
        chunk = json.loads(line[len("data: "):])
        events: list[str] = []
        if "error" in chunk:  # the request cut short (cancelled, a backend error): the stream's last
            error = chunk["error"]
            events.append(self._event("error", code=error.get("type"), message=error.get("message"),
                                      param=error.get("param")))
            failed = self._response("failed")
            failed["error"] = {"code": "server_error", "message": error.get("message")}
            events.append(self._event("response.failed", response=failed))
            return events
        if not chunk.get("choices"):  # the usage chunk: the stream's last
            events += self._close_message()
            events.append(self._event(f"response.{_ended(self.finish)}",
                                      response=self._response("completed", _usage(chunk.get("usage")))))
            return events
        choice = chunk["choices"][0]
        delta = choice.get("delta") or {}
        if delta.get("content"):
            if self.text is None:
                events += self._open_message()
            self.text.append(delta["content"])  # type: ignore[union-attr]
            events.append(self._event("response.output_text.delta", item_id=self.message_id,
                                      output_index=len(self.output), content_index=0, delta=delta["content"],
                                      logprobs=[]))
        for call in delta.get("tool_calls") or ():
            events += self._close_message()
            index, item_id = len(self.output), _new_id("fc")
            whole = {"id": call["id"], "function": call["function"]}
            events.append(self._event("response.output_item.added", output_index=index,
                                      item={**_call_item(whole, item_id, "in_progress"), "arguments": ""}))
            arguments = call["function"]["arguments"]
            events.append(self._event("response.function_call_arguments.delta", item_id=item_id,
                                      output_index=index, delta=arguments))
            events.append(self._event("response.function_call_arguments.done", item_id=item_id,
                                      output_index=index, name=call["function"]["name"], arguments=arguments))
            item = _call_item(whole, item_id)
            self.output.append(item)
            events.append(self._event("response.output_item.done", output_index=index, item=item))
        if choice.get("finish_reason") is not None:
            self.finish = choice["finish_reason"]
        return events


async def stream_events(chat_lines: AsyncIterable[Any], model: str, echoed: dict[str, Any]) -> AsyncIterator[str]:
    """The Responses API's events for the chat route's streamed body (ResponseEvents; its pieces are str, as the
    chat route yields them, or bytes)."""
    events = ResponseEvents(model, echoed)
    lines = aiter(chat_lines)
    try:
        # the chat stream started first (its role chunk comes at once): closed below, whatever ends this one, it
        # cancels its rows; never started, it would run no cleanup and its rows would generate to the end unseen
        first = await anext(lines, None)
        for event in events.start():
            yield event
        async for piece in _chained(first, lines):
            text = bytes(piece).decode("utf-8") if not isinstance(piece, str) else piece
            for line in text.split("\n\n"):
                for event in events.feed(line.strip("\n")):
                    yield event
    finally:
        close = getattr(lines, "aclose", None)
        if close is not None:
            await close()


async def _chained(first: Any, rest: AsyncIterator[Any]) -> AsyncIterator[Any]:
    if first is not None:
        yield first
    async for piece in rest:
        yield piece
