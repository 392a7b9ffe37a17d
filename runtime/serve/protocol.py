"""OpenAI request bodies (strict: unknown fields and wrong types are 400s naming the field) and their
mapping onto the runtime's GenerationConfig; OpenAI's error object.

    >>> req = parse(CompletionRequest, {"prompt": "Hi", "max_tokens": 4, "temperature": 0})
    >>> overrides(req, max_tokens=16)["max_new_tokens"], overrides(req, max_tokens=16)["do_sample"]
    (4, False)
    >>> parse(CompletionRequest, {"prompt": "Hi", "max_tokens": "4"})
    Traceback (most recent call last):
    ...
    mixtrt.runtime.serve.protocol.ApiError: max_tokens: Input should be a valid integer
"""

from __future__ import annotations

from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from mixtrt.runtime.errors import ConfigError

MAX_N = 128  # choices per request (OpenAI's limit)
MAX_LOGPROBS = 20  # alternatives per position (vLLM's default limit; OpenAI's is 5 for completions)
# stop strings are matched against each row's text at every token, on the engine loop every request shares: their
# number and length are bounded (OpenAI allows 4 strings; these leave room for lm-evaluation-harness's `until` lists)
MAX_STOP_STRINGS = 64
MAX_STOP_CHARS = 4096  # all of a request's stop strings together


class ApiError(Exception):
    """An error answered with OpenAI's error object: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, message: str, status: int = 400, param: str | None = None,
                 type: str = "invalid_request_error", code: str | None = None, logged: bool = False) -> None:
        """logged: the request's log line is already written (an error after the engine took it)."""
        # a message quoting the client's text (a model name, a field) must encode as UTF-8 even when that text
        # holds a lone surrogate, which JSON allows: escape those
        super().__init__(_escaped(message))
        self.param = None if param is None else _escaped(param)
        self.status, self.type, self.code, self.logged = status, type, code, logged

    def body(self) -> dict[str, Any]:
        return {"error": {"message": str(self), "type": self.type, "param": self.param, "code": self.code}}


def _escaped(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _whole(value: Any) -> Any:
    """A float with no fraction (2.0) as the integer it is, as vLLM's schema reads one; anything else (a string,
    a bool, 2.5) is left for the strict check to refuse. Floats past 2**53 are not exact integers: left too."""
    if type(value) is float and value.is_integer() and abs(value) <= 2**53:
        return int(value)
    return value


Int = Annotated[int, BeforeValidator(_whole)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _null_is_unset(cls, data: Any) -> Any:
        """An explicit null is the field left out (OpenAI's schema makes every optional field nullable, and
        clients that serialise unset fields send them so)."""
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None}
        return data


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's: every chunk carries the usage so far
    include_obfuscation: bool = True  # OpenAI's padding against length side channels: accepted, none is added


class StructuredOutputs(_Strict):
    """vLLM's structured_outputs (its StructuredOutputsParams): one of json (a schema, or its JSON text), regex,
    choice, grammar, json_object; its backend options at their neutral values."""

    json_: Any = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_fallback: bool = False  # one backend: nothing to fall back to
    disable_any_whitespace: bool = False  # the JSON is always written without free whitespace
    disable_additional_properties: bool = False  # what is always done: keys a schema does not name are not written
    whitespace_pattern: str | None = None  # neutral only
    structural_tag: Any = None  # neutral only


class _Sampling(_Strict):
    _constraint: tuple[Any] | None = PrivateAttr(default=None)  # (reply_constraint's answer,) once read
    model: str | None = None
    max_tokens: Int | None = Field(None, ge=0)  # 0 only with echo (completions): the prompt scored, nothing generated
    # OpenAI's newer name (chat); completions take it too, as load generators send both (guidellm)
    max_completion_tokens: Int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    top_k: Int | None = Field(None, ge=-1)  # -1 or 0: off (vLLM)
    min_p: float | None = Field(None, ge=0, le=1, allow_inf_nan=False)  # vLLM's; 0: off
    min_tokens: Int | None = Field(None, ge=0)  # vLLM's: no eos before this many tokens
    repetition_penalty: float | None = Field(None, gt=0, allow_inf_nan=False)
    stop: str | list[str] | None = None
    seed: Int | None = Field(None, ge=-2**63, lt=2**64)  # any 64-bit integer, as vLLM (a negative one: its
    # two's-complement unsigned value)
    n: Int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    stop_token_ids: list[Int] | None = None  # vLLM's: these ids end a choice too (finish_reason "stop"), EOS aside
    user: str | None = None  # accepted and unused, as every OpenAI server does (it only labels the caller)
    safety_identifier: str | None = None  # OpenAI's newer labels of the caller and of a prompt cache: unused
    prompt_cache_key: str | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2, allow_inf_nan=False)  # OpenAI's, on generated tokens
    frequency_penalty: float | None = Field(None, ge=-2, le=2, allow_inf_nan=False)
    logit_bias: dict[str, float] | None = None  # OpenAI's: token id (a JSON key: a string) -> bias, -100..100
    # structured output (runtime/structured.py), one of: OpenAI's response_format (text, json_object, json_schema),
    response_format: dict[str, Any] | None = None
    structured_outputs: StructuredOutputs | None = None  # vLLM's (json, regex, choice, grammar, json_object),
    guided_json: Any = None  # vLLM's former names of those (before 0.12), which clients still send
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None  # a backend's name: ignored, there is one (llguidance)
    guided_whitespace_pattern: str | None = None  # neutral only
    json_schema: Any = None  # llama-server's: a JSON schema,
    grammar: str | None = None  # or a grammar (GBNF, or llguidance's Lark)
    # vLLM's extras at their neutral values (the decode skips special tokens; stop strings are cut)
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False


class CompletionRequest(_Sampling):
    prompt: Any  # str, list of str, token ids, list of token-id lists: checked by the runtime's normalize_prompts
    echo: bool = False
    logprobs: Int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    # neutral values only: best_of = n (no candidates to choose among), no suffix
    best_of: Int | None = None
    suffix: str | None = None


class ChatMessage(BaseModel):
    """A message as the chat template sees it: role, content and any fields the template reads (name,
    tool_calls, ...). Content given as parts keeps only text parts."""

    model_config = ConfigDict(extra="allow", strict=True)
    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: Int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    metadata: dict[str, str] | None = None  # labels, like `user`: accepted and unused
    # OpenAI's function tools and tool_choice (runtime/tool_calls.py `tool_use`)
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None  # false: a reply's first call only
    # neutral values only (what agent frameworks and SDKs send by default): not stored
    store: bool | None = None
    service_tier: str | None = None
    functions: list[Any] | None = None  # the tools' former names: neutral only
    function_call: str | dict[str, Any] | None = None
    modalities: list[str] | None = None  # ["text"] only
    add_generation_prompt: bool = True  # vLLM's: False renders the messages without the assistant's opening
    # vLLM's: the last (assistant) message continued (with add_generation_prompt false)
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None  # vLLM's: neutral only (empty)
    echo: bool = False  # vLLM's: a reply continuing an assistant message (the last) starts with that message


class TokenizeRequest(_Strict):
    """vLLM's /tokenize: a text `prompt` (BOS first unless add_special_tokens is false) or chat `messages` (the ids
    /v1/chat/completions would prefill, with its add_generation_prompt / continue_final_message)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool = True  # a prompt's BOS (messages: the chat format decides)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    tools: list[Any] | None = None  # with messages: shown as /v1/chat/completions shows them
    # and the chat route's tool_choice (an extension of vLLM's): "none" as it shows the tools, a forced choice's start
    tool_choice: Any = None
    return_token_strs: bool = False  # also each token's piece


class DetokenizeRequest(_Strict):
    """vLLM's /detokenize: the text of token ids (special tokens skipped, as completions' text)."""

    model: str | None = None
    tokens: list[int]


M = TypeVar("M", bound=_Strict)


def parse(model: type[M], body: Any) -> M:
    """Validate a decoded JSON body; the first problem becomes a 400 naming its field."""
    if not isinstance(body, dict):
        raise ApiError(f"the request body must be a JSON object, got {type(body).__name__}")
    for key, value in body.items():  # pydantic reports a key that is not valid text (a lone surrogate) at no location
        if key not in model.model_fields and value is not None:  # null: left out, a field we know or not
            raise ApiError(f"unknown field '{key}'", param=key)
    try:
        req = model.model_validate(body)
    except ValidationError as e:
        raise _first_problem(e.errors()) from None
    if isinstance(req, _Sampling):
        _check_neutral(req)
    return req


# pydantic names the member of a union a value failed as a part of its location ("stop", "list[str]", 1), right
# after the union field: these are our union fields and their members, as the client would read them
_UNIONS = {"stop", "content", "tool_choice", "function_call"}
_MEMBERS = {"str": "a string", "list[str]": "a list of strings", "dict[str,any]": "an object",
            "list[dict[str,any]]": "a list of content parts"}
_BOUNDS = {"less_than": ("lt", "less than"), "less_than_equal": ("le", "less than or equal to"),
           "greater_than": ("gt", "greater than"), "greater_than_equal": ("ge", "greater than or equal to")}


def _is_member(loc: tuple[Any, ...], i: int) -> bool:
    """loc[i] is pydantic's name of a union member (not a client's dict key that happens to read the same)."""
    return i > 0 and loc[i] in _MEMBERS and loc[i - 1] in _UNIONS


def _first_problem(errors: list[Any]) -> ApiError:
    """The first validation error as a 400 naming its field, in the client's terms: a value that fits no member of
    a union is told what the field takes (not the first member's complaint), a value of a member's shape with a
    wrong part has that part named, a member's name never shows in the field's path, and bounds are the exact
    integers (pydantic prints 2**64 as a rounded float)."""
    err = errors[0]
    raw = tuple(err["loc"])
    at = next((i for i in range(len(raw)) if _is_member(raw, i)), None)
    if at is not None:
        same = [e for e in errors if len(e["loc"]) > at and tuple(e["loc"][:at]) == raw[:at] and
                _is_member(tuple(e["loc"]), at)]
        deeper = [e for e in same if len(e["loc"]) > at + 1]
        if deeper:  # the value had a member's shape (a list) and a part of it is wrong: that part named
            err = deeper[0]
        elif len(same) > 1:
            where = ".".join(str(p) for p in raw[:at])
            return ApiError(f"{where}: must be " + " or ".join(_MEMBERS[e["loc"][at]] for e in same),
                            param=str(raw[0]))
    loc = [p for i, p in enumerate(err["loc"]) if not _is_member(tuple(err["loc"]), i)]
    where = ".".join(str(p) for p in loc)
    param = str(loc[0]) if loc else None
    if err["type"] == "extra_forbidden":
        return ApiError(f"unknown field '{where}'", param=where)
    bound = _BOUNDS.get(err["type"])
    if bound and isinstance(err.get("ctx", {}).get(bound[0]), int):
        return ApiError(f"{where}: Input should be {bound[1]} {err['ctx'][bound[0]]}", param=param)
    return ApiError(f"{where}: {err['msg']}", param=param)


def _check_neutral(req: _Sampling) -> None:
    if req.max_tokens == 0 and not (isinstance(req, CompletionRequest) and req.echo):
        raise ApiError("max_tokens: must be at least 1" if isinstance(req, ChatRequest) else
                       "max_tokens: 0 generates nothing; it is allowed only with echo (the prompt echoed and, with "
                       "logprobs, scored)", param="max_tokens")
    if isinstance(req, CompletionRequest):
        if req.best_of is not None and req.best_of != req.n:
            raise ApiError(f"best_of is not supported (only equal to n, {req.n})", param="best_of")
        if req.suffix:
            raise ApiError("suffix is not supported (insertion)", param="suffix")
    if isinstance(req, ChatRequest):
        if req.continue_final_message and (asked := reply_constraint(req)) is not None:  # a 400 before any work
            raise ApiError(f"{asked[0]}: the reply would be text of its own form after the continued message's "
                           "text (continue_final_message), not a continuation of it: give one of them",
                           param=asked[0].split(".")[0])
        if req.store:
            raise ApiError("store is not supported (only false)", param="store")
        if req.service_tier not in (None, "auto", "default"):
            raise ApiError("service_tier is not supported (only \"auto\" or \"default\")", param="service_tier")
    so = req.structured_outputs
    for name, value in (("structured_outputs.whitespace_pattern", so and so.whitespace_pattern),
                        ("structured_outputs.structural_tag", so and so.structural_tag),
                        ("guided_whitespace_pattern", req.guided_whitespace_pattern)):
        if value:
            raise ApiError(f"{name} is not supported (the JSON is written with json.dumps' separators, and "
                           "keys a schema does not name left out)", param=name.split(".")[0])
    for name in ("skip_special_tokens", "spaces_between_special_tokens"):
        if not getattr(req, name):
            raise ApiError(f"{name} is not supported (only true)", param=name)
    if req.include_stop_str_in_output:
        raise ApiError("include_stop_str_in_output is not supported (only false)", param="include_stop_str_in_output")
    if isinstance(req, ChatRequest):
        if req.functions:
            raise ApiError("functions are not supported (only an empty list)", param="functions")
        if req.function_call not in (None, "none", "auto"):
            raise ApiError("function_call is not supported (only \"none\" or \"auto\" without functions)",
                           param="function_call")
        if req.modalities not in (None, ["text"]):
            raise ApiError("modalities: only [\"text\"] is supported", param="modalities")
        check_continuation(req)
        if req.chat_template_kwargs:
            raise ApiError("chat_template_kwargs is not supported (only empty)", param="chat_template_kwargs")
    if req.stream_options is not None and not req.stream:
        raise ApiError("stream_options is only allowed with stream: true", param="stream_options")
    stops = [req.stop] if isinstance(req.stop, str) else req.stop or []
    if any(not s for s in stops):
        raise ApiError("stop: stop strings must be non-empty", param="stop")
    chars = sum(len(s) for s in stops)
    if len(stops) > MAX_STOP_STRINGS or chars > MAX_STOP_CHARS:
        raise ApiError(f"stop: at most {MAX_STOP_STRINGS} stop strings of {MAX_STOP_CHARS} characters in all, got "
                       f"{len(stops)} of {chars} (each is matched at every token, on the engine loop the server's "
                       "requests share)", param="stop")
    if isinstance(req, ChatRequest) and req.top_logprobs and not req.logprobs:
        raise ApiError("top_logprobs needs logprobs: true", param="top_logprobs")


def check_continuation(req: ChatRequest | TokenizeRequest) -> None:
    """vLLM's rule: a continued last message is not also answered."""
    if req.continue_final_message and req.add_generation_prompt:
        raise ApiError("continue_final_message needs add_generation_prompt: false (the last message is continued, "
                       "not answered)", param="continue_final_message")


def chat_messages(req: ChatRequest | TokenizeRequest, text_parts: bool = False) -> list[dict[str, Any]]:
    """The messages as plain dicts for the chat format. Content parts (text parts only): kept as the list with
    text_parts (a Mistral format: mistral-common joins them, with a blank line up to v13), else joined by newlines,
    as vLLM joins them for a chat template. OpenAI's `developer` role (its newer name for instructions) is the
    templates' `system`; a `content: null` the client sent stays in the message (the template judges it)."""
    out = []
    for i, m in enumerate(req.messages or []):
        d = m.model_dump(exclude_none=True)
        if m.content is None and "content" in m.model_fields_set:  # sent as null: kept, not dropped with the Nones
            d["content"] = None
        if d.get("role") == "developer":
            d["role"] = "system"
        if isinstance(m.content, list):
            texts = []
            for part in m.content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ApiError(f"messages[{i}].content: only text parts are supported", param="messages")
                texts.append(part["text"])
            d["content"] = [{"type": "text", "text": t} for t in texts] if text_parts else "\n".join(texts)
        out.append(d)
    return out


# where a request can ask for structured output: (its field, GenerationConfig's field)
_CONSTRAINTS = (("response_format", "json_schema"), ("structured_outputs.json", "json_schema"),
                ("structured_outputs.regex", "regex"), ("structured_outputs.choice", "choice"),
                ("structured_outputs.grammar", "grammar"), ("structured_outputs.json_object", "json_schema"),
                ("guided_json", "json_schema"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                ("guided_grammar", "grammar"), ("json_schema", "json_schema"), ("grammar", "grammar"))


def reply_constraint(req: CompletionRequest | ChatRequest) -> tuple[str, str, Any] | None:
    """The structured output a request asks for, checked (runtime/structured.py): (the request's field, the
    GenerationConfig field, its value), None for free text. A request names one: two are a 400. Read once per
    request, where first asked (the server's request thread), then remembered on it."""
    if req._constraint is None:
        req._constraint = (_read_constraint(req),)
    return req._constraint[0]


def _read_constraint(req: CompletionRequest | ChatRequest) -> tuple[str, str, Any] | None:
    from mixtrt.runtime import structured

    asked = []
    for name, field in _CONSTRAINTS:
        head, _, tail = name.partition(".")
        value = getattr(req, head)
        if tail and value is not None:
            value = getattr(value, "json_" if tail == "json" else tail)
        if value is None or (tail == "json_object" and value is False):
            continue
        try:
            if name == "response_format":
                value = structured.response_format_schema(value)
                if value is None:  # {"type": "text"}
                    continue
            elif tail == "json_object":
                value = structured.check_schema({"type": "object"}, name)
            else:
                value = structured.check(field, value, name)
        except ConfigError as e:
            raise ApiError(str(e), param=head) from None
        asked.append((name, field, value))
    if len(asked) > 1:
        raise ApiError(f"{asked[0][0]} and {asked[1][0]}: give one of them (each constrains the whole reply)",
                       param=asked[1][0].split(".")[0])
    if req.structured_outputs is not None and not any(name.startswith("structured_outputs.") for name, _, _ in asked):
        raise ApiError("structured_outputs: give one of json, regex, choice, grammar or json_object (vLLM's rule)",
                       param="structured_outputs")
    return asked[0] if asked else None


def length_field(req: CompletionRequest | ChatRequest) -> tuple[str, int | None]:
    """The field that sets a request's length and its value: `max_completion_tokens` where sent (OpenAI's newer
    name; it wins over `max_tokens`, as in vLLM), else `max_tokens` (None: neither was sent)."""
    if req.max_completion_tokens is not None:
        return "max_completion_tokens", req.max_completion_tokens
    return "max_tokens", req.max_tokens


def overrides(req: CompletionRequest | ChatRequest, max_tokens: int, default_temperature: float | None = None
              ) -> dict[str, Any]:
    """GenerationConfig keywords over the artifact's defaults (Generator.config). Sampling as OpenAI's API and
    vLLM do it: a request samples unless its temperature is 0 (greedy); without one, at `default_temperature`
    (the artifact's generation_config.json temperature) else 1. Other omitted fields keep the artifact's
    defaults (top_p, top_k, repetition_penalty). `max_tokens` is the default when the request sets no length
    (length_field).

    >>> overrides(parse(ChatRequest, {"messages": [{"role": "user", "content": "Hi"}]}), 64)["temperature"]
    1.0
    """
    asked = length_field(req)[1]
    out: dict[str, Any] = {"max_new_tokens": max_tokens if asked is None else asked}
    temperature = req.temperature if req.temperature is not None else \
        default_temperature if default_temperature is not None else 1.0
    if temperature == 0:
        out["do_sample"] = False
    else:
        out["do_sample"] = True
        out["temperature"] = temperature
    if req.top_p is not None:
        out["top_p"] = req.top_p
    if req.top_k is not None:
        out["top_k"] = max(req.top_k, 0)
    if req.min_p is not None:
        out["min_p"] = req.min_p
    if req.min_tokens is not None:
        out["min_new_tokens"] = req.min_tokens
    if req.repetition_penalty is not None:
        out["repetition_penalty"] = req.repetition_penalty
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name) is not None:
            out[name] = getattr(req, name)
    if req.logit_bias:
        out["logit_bias"] = req.logit_bias
    if req.seed is not None:
        out["seed"] = req.seed % 2**64
    if req.stop is not None:
        out["stop_strings"] = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop)
    if req.ignore_eos:
        out["eos_token_id"] = ()
    if (constraint := reply_constraint(req)) is not None:
        out[constraint[1]] = constraint[2]
    k = req.logprobs if isinstance(req, CompletionRequest) else (req.top_logprobs or 0) if req.logprobs else None
    if k is not None:
        out["return_logprobs"] = True
        out["top_logprobs"] = k
    return out
