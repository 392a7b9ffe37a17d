"""Tool calls: the tools a chat request offers, checked, and a reply's calls read back from its token ids.

Mistral's formats start a call with the `[TOOL_CALLS]` control token, which decoding never shows, so a reply
is read from its ids, not its text. Two bodies follow the token, as mistral-common encodes an assistant's
calls (and the models were trained on):

- a JSON list (v2, v3, v7; sentencepiece and tekken): `[TOOL_CALLS][{"name": "f", "arguments": {...},
  "id": "a1b2c3d4e"}, ...]`;
- name and arguments per call (tekken v11 and later): `[TOOL_CALLS]f[CALL_ID]a1b2c3d4e[ARGS]{...}` (v11 with
  an id) or `[TOOL_CALLS]f[ARGS]{...}` (v13), one such group per call.

ChatML fine-tunes of these models (Hermes 2 Pro and its kin; vLLM's `hermes` parser) write each call between
`<tool_call>` and `</tool_call>` added tokens: `<tool_call>\n{"name": "f", "arguments": {...}}\n</tool_call>`,
read the same way from the ids where a Jinja template's tokenizer has both tokens.

    >>> from mixtrt.runtime.tokenizer import shipped_tokenizer_path
    >>> from mixtrt.runtime.mistral_tokenizer import MistralCommonTokenizer
    >>> tok = MistralCommonTokenizer(shipped_tokenizer_path().parent / "mistral_instruct_tokenizer_240323.model.v3")
    >>> ids = tok.encode("Let me look.", bos=False) + [5] + tok.encode('[{"name": "get_weather", '
    ...     '"arguments": {"city": "Paris"}, "id": "a1b2c3d4e"}]', bos=False) + [tok.eos_id]
    >>> [call] = read_tool_calls(ids, tok).calls          # [TOOL_CALLS] is id 5 in v3
    >>> call.name, call.arguments, call.id != "a1b2c3d4e"  # a fresh id, never the model's (new_call_id)
    ('get_weather', '{"city": "Paris"}', True)

A reply whose calls do not parse (cut by max_tokens or a stop string, JSON the model got wrong, a call without
a name or with arguments that are not an object) is no call: `read_tool_calls` gives None and the reply stays
text, as vLLM's Mistral parser leaves it.

A format with neither (v1, a template of another family: Mixtral-8x7B-Instruct-v0.1's) cannot write a call of its
own, so "auto" is refused there; a forced tool_choice is served as vLLM serves it on any model, the whole reply
held to the call's JSON and read as the call: a named function's arguments object, or for "required" a JSON list
`[{"name": "f", "arguments": {...}}, ...]` of offered functions (ToolUse.tokens None).
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mixtrt.runtime.errors import ConfigError
from mixtrt.runtime.prompts import check_strings

# mistral-common's rules (its tokenizers refuse anything else on the next turn): a function name of letters,
# digits, "_" and "-", at most 64; a call id of exactly 9 letters and digits (v3 and later)
NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
CALL_ID = re.compile(r"[a-zA-Z0-9]{9}")
_ID_CHARS = string.ascii_letters + string.digits
NO_TOOL_TOKENS = ("the model's chat format has no tool-call token ([TOOL_CALLS]): mixtrt reads the calls of Mistral's "
                  "formats (v2 and later, tekken, or a template whose tokenizer has [TOOL_CALLS]) and of ChatML "
                  "templates whose tokenizer has <tool_call> and </tool_call>; on this one a forced tool_choice "
                  "(\"required\" or a named function) is served, the reply held to the call's JSON")


@dataclass(frozen=True)
class ToolCall:
    """One call of a reply: its id, the function's name and its arguments as a JSON object's text."""

    id: str
    name: str
    arguments: str

    def to_openai(self) -> dict[str, Any]:
        """OpenAI's form: {"id", "type": "function", "function": {"name", "arguments"}}."""
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class ToolReply:
    """A reply read as calls: the text before the first call (None when there is none) and the calls."""

    content: str | None
    calls: tuple[ToolCall, ...]


@dataclass(frozen=True)
class ToolTokens:
    """A tokenizer's tool-call control tokens: `[TOOL_CALLS]`, and where the format has them `[ARGS]` and
    `[CALL_ID]`; or a ChatML fine-tune's `<tool_call>` (calls) and `</tool_call>` (end) tags."""

    calls: int
    args: int | None = None
    call_id: int | None = None
    end: int | None = None


@dataclass(frozen=True)
class ToolUse:
    """How a chat request's replies are read: the tokenizer's tool tokens (None: a format without them, whose
    forced reply is the call's JSON: the module's doc), the ids its tool_choice put after the prompt (the start of a
    call the model then completes; empty for "auto"), and whether a reply may make several calls (OpenAI's
    parallel_tool_calls; False keeps the first)."""

    tokens: ToolTokens | None
    forced: tuple[int, ...] = ()
    parallel: bool = True
    names: frozenset[str] = frozenset()  # the functions offered (empty: any name)
    # a forced call: the Lark grammar (runtime/structured.py) the rest of the reply is held to, each function's
    # arguments to its `parameters` schema; None for "auto"
    grammar: str | None = None
    named: str | None = None  # tokens None: the function a named choice calls (its reply is the arguments alone)

    @property
    def call_forced(self) -> bool:
        """Whether tool_choice makes the reply a call ("required" or a named function): held to `grammar`."""
        return self.grammar is not None

    def reply(self, out: Any, tokenizer: Any) -> ToolReply | None:
        """A finished reply's calls (a GenerationOutput: token_ids, finish_reason), the forced start included;
        None when it makes none, calls a function that was not offered, or was cut by its length (text, whatever
        it holds)."""
        if out.finish_reason == "length":
            return None
        # the eos id that ended it is not the reply's (an eos that is a text piece would show after the calls)
        ids = list(out.token_ids[:-1] if out.finish_reason == "eos" else out.token_ids)
        if self.tokens is None:  # the reply is the call's JSON
            text = tokenizer.decode(ids)
            if self.named is None:
                calls = _json_calls(text)
            else:
                arguments = _object(text)
                calls = None if arguments is None else [ToolCall(new_call_id(), self.named, arguments)]
            reply = ToolReply(None, tuple(calls)) if calls else None
        else:
            reply = read_tool_calls([*self.forced, *ids], tokenizer, self.tokens)
        if reply is None or (self.names and any(c.name not in self.names for c in reply.calls)):
            return None
        return reply if self.parallel else ToolReply(reply.content, reply.calls[:1])

    def text(self, out: Any, tokenizer: Any) -> str:
        """The text of a reply that makes no calls: its own, after the text of a forced start (a named call's
        start would be cut off from the JSON the model wrote after it)."""
        if not self.forced:
            return str(out.text)
        own = tokenizer.decode(out.token_ids)
        whole = tokenizer.decode([*self.forced, *out.token_ids])
        start = whole[:len(whole) - len(own)] if whole.endswith(own) else tokenizer.decode(self.forced)
        return start + str(out.text)


class ToolStream:
    """A streamed reply's text while tools are offered: the text from its first call token on (all of it after a
    forced start) is held back until the reply finishes and is read. feed() each token's text, then finish()."""

    def __init__(self, use: ToolUse, tokenizer: Any) -> None:
        self.use, self.tokenizer = use, tokenizer
        self.held: list[str] | None = [] if use.call_forced else None  # None until a call token
        self.sent: list[str] = []

    def feed(self, token: int | None, text: str) -> str:
        """The text to show now for a token and the text it completed."""
        if self.held is not None:
            self.held.append(text)
            return ""
        if self.use.tokens is not None and token == self.use.tokens.calls:
            # the call token's text is what it completed before the call, and a tag that shows (<tool_call>) itself
            tag = self.tokenizer.decode([token]) if self.use.tokens.end is not None else ""
            # the tag's text, or the start of it where a stop string's filter holds its end back ("<tool_call")
            shown = next((k for k in range(len(tag), 0, -1) if text.endswith(tag[:k])), 0)
            self.held = [text[len(text) - shown:]] if shown else []
            text = text[:len(text) - shown]
        self.sent.append(text)
        return text

    def finish(self, out: Any) -> tuple[str, ToolReply | None]:
        """(the text still to show, the calls) once the reply's output is in. With calls: the rest of the text
        before them (a stop string's held-back prefix the engine let out only after the call token); without:
        everything held back."""
        reply = self.use.reply(out, self.tokenizer)
        sent = "".join(self.sent)
        if reply is not None:
            content = reply.content or ""
            return (content[len(sent):] if content.startswith(sent) else ""), reply
        whole = self.use.text(out, self.tokenizer)
        return (whole[len(sent):] if whole.startswith(sent) else "".join(self.held or ())), None


def tool_use(tokenizer: Any, tools: Any, tool_choice: Any = None, parallel: bool = True, where: str = "tools"
             ) -> tuple[list[dict[str, Any]] | None, ToolUse | None]:
    """(the tools a prompt shows, how its replies are read) for OpenAI's `tools` and `tool_choice`: "auto" (None)
    lets the model choose; "none" shows them (as OpenAI and vLLM do) where the format has call tokens, and the
    reply is text: `calls_banned` keeps the model from starting a call; "required" starts the reply with the
    first call token ([TOOL_CALLS], <tool_call>) and holds the rest to a grammar of calls of the offered functions;
    {"type": "function", "function": {"name": ...}} to one call of that function (in the JSON list, the forced start
    also writes its name). A format without tool-call tokens takes the forced choices only, the whole reply held to
    the call's JSON (the module's doc). (None, None) without tools."""
    offered = check_tools(tools, where)
    if tool_choice not in (None, "auto", "none", "required") and not _named(tool_choice):
        raise ConfigError(f"tool_choice: must be \"auto\", \"none\", \"required\" or {{\"type\": \"function\", "
                          f"\"function\": {{\"name\": ...}}}}, got {json.dumps(tool_choice, default=repr)}")
    if offered is None:
        if tool_choice not in (None, "auto", "none"):
            raise ConfigError(f"tool_choice: {json.dumps(tool_choice)} needs tools, and none are given")
        return None, None
    if tool_choice == "none":  # a format without call tokens (v1) has no way to show tools: none shown
        return (offered if tool_tokens(tokenizer) is not None else None), None
    tokens = tool_tokens(tokenizer)
    names = frozenset(t["function"]["name"] for t in offered)
    if tool_choice in (None, "auto"):
        if tokens is None:
            raise ConfigError(f"{where}: {NO_TOOL_TOKENS}")
        return offered, ToolUse(tokens, (), parallel, names)
    name = tool_choice["function"]["name"] if tool_choice != "required" else None
    if name is not None and name not in names:
        raise ConfigError(f"tool_choice: the function {name!r} is not one of the tools given")
    from mixtrt.runtime.extras import require  # the call is held to a grammar (llguidance)

    require("structured", f"tool_choice {json.dumps(tool_choice)} (the call held to the tools' parameters)")
    only = None if name is None else [t["function"]["name"] for t in offered].index(name)
    if tokens is None:  # the reply is the call's JSON: the arguments object, or a list of calls
        grammar = _calls_grammar(offered, parallel, where, ids=False) if only is None else \
            _checked_grammar(f"start: args{only}\n{_arguments_rule(offered, only, where)}", where)
        return offered, ToolUse(None, (), parallel and only is None, names, grammar, name)
    if tokens.args is not None or tokens.end is not None:  # name[ARGS]arguments / <tool_call>...</tool_call>
        # a named choice is one call of that function (OpenAI's); the grammar writes the function's name
        grammar = _tagged_grammar(offered, tokens, parallel and only is None, where, only)
        return offered, ToolUse(tokens, (tokens.calls,), parallel and only is None, names, grammar)
    if tool_choice == "required":
        return offered, ToolUse(tokens, (tokens.calls,), parallel, names, _calls_grammar(offered, parallel, where))
    # the JSON list, as mistral-common writes it, up to the arguments' value; then that function's arguments (only
    # the chosen function's schema matters)
    start = tokenizer.encode(f'[{{"name": {json.dumps(name)}, "arguments":', bos=False)
    from mixtrt.runtime.structured import OWN_SPACE

    grammar = OWN_SPACE + "\n".join([f'start: " " args{only} id "}}]"', *_call_rules(offered, where, only=only)])
    return offered, ToolUse(tokens, (tokens.calls, *start), False, names, _checked_grammar(grammar, where))


def calls_banned(tokenizer: Any, tools: Any, tool_choice: Any) -> tuple[int, ...]:
    """The ids a reply under tool_choice "none" never chooses (GenerationConfig.suppress_tokens), so it cannot call
    the tools its prompt shows: the token a call starts with; () otherwise."""
    if tool_choice != "none" or not tools:
        return ()
    tokens = tool_tokens(tokenizer)
    return () if tokens is None else (tokens.calls,)


def _call_rules(offered: list[dict[str, Any]], where: str, only: int | None = None, ids: bool = True) -> list[str]:
    """Lark rules of one call per function (or of function `only`) as mistral-common writes it in the JSON list:
    `{"name": ..., "arguments": <the JSON object its parameters schema accepts>` and an optional `, "id": "<9 letters
    and digits>"` (ids False: none, as the tag form's calls carry none), then `}`."""
    chosen = range(len(offered)) if only is None else [only]
    id_head = json.dumps(', "id": "')
    rules = [f'id: ({id_head} /[a-zA-Z0-9]{{9}}/ "\\"")?' if ids else 'id: ""',
             "call: " + " | ".join(f"call{n}" for n in chosen)]
    for n in chosen:
        head = json.dumps(f'{{"name": {json.dumps(offered[n]["function"]["name"])}, "arguments": ')
        rules += [f'call{n}: {head} args{n} id "}}"', _arguments_rule(offered, n, where)]
    return rules


def _arguments_rule(offered: list[dict[str, Any]], n: int, where: str) -> str:
    """The Lark rule `args{n}`: the JSON object function n's parameters schema accepts (checked, naming the tool)."""
    from mixtrt.runtime.structured import check_schema, json_rule

    params = _object_schema(offered[n]["function"].get("parameters"), f"{where}[{n}].function.parameters")
    check_schema(params, f"{where}[{n}].function.parameters")
    return f"args{n}: {json_rule(params)}"


def _object_schema(params: Any, where: str) -> dict[str, Any]:
    """A function's parameters schema as one of JSON objects (a call's arguments are an object): none or {} -> any
    object; no type -> the same schema typed "object" (its keywords then apply to objects); a type list with
    "object" -> "object"; a schema of other types only is refused."""
    if not params:
        return {"type": "object"}
    kind = params.get("type")
    if kind is None or kind == "object" or (isinstance(kind, list) and "object" in kind):
        return {**params, "type": "object"}
    raise ConfigError(f"{where}: a call's arguments are a JSON object, and this schema allows {json.dumps(kind)} "
                      "only: a forced tool_choice cannot hold a call to it")


def _calls_grammar(offered: list[dict[str, Any]], parallel: bool, where: str, ids: bool = True) -> str:
    """What follows a forced [TOOL_CALLS] in the JSON-list form (or makes a whole reply: ids False, no call ids): a
    list of calls (one with parallel False). A sentencepiece "▁[" in front is the guide's lead space
    (runtime/structured.py)."""
    more = ' ("," " " call)*' if parallel else ""
    return _checked_grammar("\n".join([f'start: "[" call{more} "]"', *_call_rules(offered, where, ids=ids)]), where)


def _tagged_grammar(offered: list[dict[str, Any]], tokens: ToolTokens, parallel: bool, where: str,
                    only: int | None = None) -> str:
    """What follows a forced first call token where each call has tokens of its own: `name[CALL_ID]id[ARGS]{...}`
    / `name[ARGS]{...}` (tekken v11 / v13: the call id where the tokenizer has [CALL_ID], as mistral-common writes
    it then) or `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` (the tag form); one call with
    parallel False or a named choice (`only`), else more, each after its own first token. Control tokens are
    llguidance's `<[id]>`."""
    if tokens.end is not None:  # the tag form as its templates write it: a newline, the JSON object, a newline
        rules = _call_rules(offered, where, only, ids=False)
        one = f'"\\n" call "\\n" <[{tokens.end}]>'
        more = f' ("\\n"? <[{tokens.calls}]> {one})*' if parallel else ""  # no free whitespace to run off into
        return _checked_grammar("\n".join([f"start: {one}{more}", *rules]), where)
    assert tokens.args is not None
    chosen, rules = (range(len(offered)) if only is None else [only]), []
    call_id = f' (<[{tokens.call_id}]> /[a-zA-Z0-9]{{9}}/)?' if tokens.call_id is not None else ""
    for n in chosen:
        rules += [f'call{n}: {json.dumps(offered[n]["function"]["name"])}{call_id} <[{tokens.args}]> args{n}',
                  _arguments_rule(offered, n, where)]
    more = f" (<[{tokens.calls}]> call)*" if parallel else ""
    rules.append("call: " + " | ".join(f"call{n}" for n in chosen))
    return _checked_grammar("\n".join([f"start: call{more}", *rules]), where)


def _checked_grammar(grammar: str, where: str) -> str:
    from mixtrt.runtime.structured import check_grammar

    return check_grammar(grammar, where)


def chat_prompt(tokenizer: Any, messages: Sequence[Mapping[str, Any]], offered: list[dict[str, Any]] | None,
                use: ToolUse | None, tool_choice: Any = None, **template: Any) -> list[int]:
    """A chat prompt's ids with the tools shown (tool_use's `offered`) and a forced call's start after them. A
    Jinja template that renders the same with and without the tools would hide them from the model: refused,
    except under tool_choice "none" (the tools are context there, not a way to answer)."""
    if not offered:
        return list(tokenizer.apply_chat_template(messages, **template))
    if tool_tokens(tokenizer) is None:  # a forced call's JSON (tool_use took nothing else): shown where a template can
        shown = offered if getattr(tokenizer, "templates", None) is not None else None
        return list(tokenizer.apply_chat_template(messages, tools=shown, **template))
    ids = list(tokenizer.apply_chat_template(messages, tools=offered, **template))
    if tool_choice != "none" and getattr(tokenizer, "templates", None) is not None \
            and ids == _without_tools(tokenizer, messages, template):
        raise ConfigError("tools: the checkpoint's chat template does not show tools (it renders the same "
                          "conversation with and without them), so the model would never see them")
    return ids + list(use.forced if use is not None else ())


def _without_tools(tokenizer: Any, messages: Sequence[Mapping[str, Any]], template: dict[str, Any]) -> list[int] | None:
    """The conversation's ids rendered without tools, None where that render fails: a checkpoint whose templates
    are a `tool_use` one and a `default` one (Hermes 2 Pro's) takes the default without tools, which need not
    render tool calls and results; a template that shows the tools renders them in any case."""
    try:
        return list(tokenizer.apply_chat_template(messages, **template))
    except ConfigError:
        return None


def _named(choice: Any) -> bool:
    return isinstance(choice, Mapping) and choice.get("type") == "function" and \
        isinstance(choice.get("function"), Mapping) and isinstance(choice["function"].get("name"), str)


def mistral_call_id(call_id: Any) -> Any:
    """A call id in the form Mistral's formats take (9 letters and digits): an id of that form as it is, another
    string (OpenAI's `call_...`, a client's own) as 9 characters drawn from its hash, the same for the call and
    its result; anything else unchanged (the format's own check names it)."""
    if not isinstance(call_id, str) or CALL_ID.fullmatch(call_id):
        return call_id
    number = int.from_bytes(hashlib.sha256(call_id.encode("utf-8", "surrogatepass")).digest()[:8], "big")
    digits = []
    for _ in range(9):
        number, digit = divmod(number, len(_ID_CHARS))
        digits.append(_ID_CHARS[digit])
    return "".join(digits)


def mistral_ids(message: Mapping[str, Any]) -> Mapping[str, Any]:
    """A message's call ids in the form Mistral's formats take (mistral_call_id): an id OpenAI or a client made
    (`call_...`) is refused by mistral-common and by Mistral's Jinja templates; mapped the same way in the call and
    in its result."""
    calls = message.get("tool_calls")
    if message.get("role") == "assistant" and isinstance(calls, list):
        calls = [{**c, "id": mistral_call_id(c.get("id"))} if isinstance(c, Mapping) and "id" in c else c
                 for c in calls]
        return {**message, "tool_calls": calls}
    if message.get("role") == "tool" and "tool_call_id" in message:
        return {**message, "tool_call_id": mistral_call_id(message["tool_call_id"])}
    return message


def new_call_id() -> str:
    """A fresh call id: 9 random letters and digits, the only form Mistral's v3 and later formats take back."""
    return "".join(secrets.choice(_ID_CHARS) for _ in range(9))


def tool_tokens(tokenizer: Any) -> ToolTokens | None:
    """The tokenizer's tool-call tokens; None when its chat format has neither `[TOOL_CALLS]` nor the
    `<tool_call>` / `</tool_call>` tags (v1, a template of another family): such a format cannot call tools."""
    find = getattr(tokenizer, "tool_tokens", None)
    return find() if callable(find) else None


def check_tools(tools: Any, where: str = "tools") -> list[dict[str, Any]] | None:
    """OpenAI's tool list checked: [{"type": "function", "function": {"name", "description"?, "parameters"?}}];
    None and [] are no tools (None). Names follow mistral-common's rule; names are unique."""
    if tools is None:
        return None
    if isinstance(tools, (str, bytes, Mapping)) or not isinstance(tools, Sequence):
        raise ConfigError(f"{where}: must be a list of {{'type': 'function', 'function': {{...}}}} objects, "
                          f"got {type(tools).__name__}")
    check_strings(tools, where)  # a description's lone surrogate failed in the tokenizer (a 500 on the server)
    seen: set[str] = set()
    out = []
    for n, tool in enumerate(tools):
        at = f"{where}[{n}]"
        function, name = _function_of(tool, at, "tools", "a name")
        if name in seen:
            raise ConfigError(f"{at}.function.name: {name!r} is offered twice")
        seen.add(name)
        # null: left out, as OpenAI's schema reads; other fields are the client's (transformers' get_json_schema
        # adds "return"), shown to a template that reads them
        function = {k: v for k, v in function.items() if v is not None}
        if not isinstance(function.get("description", ""), str):
            raise ConfigError(f"{at}.function.description: must be a string")
        if not isinstance(function.get("strict", False), bool):
            raise ConfigError(f"{at}.function.strict: must be true or false, got {function['strict']!r}")
        if not isinstance(function.get("parameters", {}), Mapping):
            raise ConfigError(f"{at}.function.parameters: must be a JSON schema object")
        # shown to the model whatever tool_choice is: a schema that is not one ("type": "strin") is refused for
        # "auto" and "none" too (it was checked only where a forced choice compiled it); a valid one that llguidance
        # cannot enforce (a look-around pattern) is still offered: only a forced choice compiles it
        check_schema_shape(function.get("parameters", {}), f"{at}.function.parameters")
        out.append({"type": "function", "function": function})
    return out or None


JSON_TYPES = ("string", "number", "integer", "boolean", "object", "array", "null")
# JSON Schema's keywords whose value is one schema (items and additionalItems: or, in the older drafts' tuple form, a
# list of them), a map of names to schemas, a list of schemas: the shape check here and structured.py's closing walk
SCHEMA_ONE = ("items", "additionalProperties", "not", "contains", "propertyNames", "if", "then", "else",
              "additionalItems", "unevaluatedProperties", "unevaluatedItems")
SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")


def check_schema_shape(schema: Any, where: str, depth: int = 0) -> None:
    """The keywords that hold types or other schemas have the form JSON Schema gives them (a type among JSON's
    seven, subschemas objects or booleans, lists where lists go, required a list of names); one ConfigError naming
    the keyword's place. Not whether a grammar can enforce it (structured.check_schema, for forced choices)."""
    if isinstance(schema, bool):
        return
    if not isinstance(schema, Mapping):
        raise ConfigError(f"{where}: a JSON schema must be an object or a boolean, got {type(schema).__name__}")
    if depth > 64:
        raise ConfigError(f"{where}: nested too deeply")
    if "type" in schema:
        kinds = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not kinds or any(not isinstance(k, str) or k not in JSON_TYPES for k in kinds):
            raise ConfigError(f"{where}.type: {json.dumps(schema['type'])} is not a JSON schema type (one of "
                              f"{', '.join(JSON_TYPES)}, or a list of them)")
    required = schema.get("required")
    if required is not None and (not isinstance(required, list) or not all(isinstance(r, str) for r in required)):
        raise ConfigError(f"{where}.required: must be a list of property names")
    if "enum" in schema and not isinstance(schema["enum"], list):
        raise ConfigError(f"{where}.enum: must be a list of values")
    for key in SCHEMA_MAPS:
        if key in schema:
            if not isinstance(schema[key], Mapping):
                raise ConfigError(f"{where}.{key}: must be an object of schemas")
            for name, sub in schema[key].items():
                check_schema_shape(sub, f"{where}.{key}.{name}", depth + 1)
    for key in SCHEMA_ONE:
        if key in schema:
            subs = schema[key] if key in ("items", "additionalItems") and isinstance(schema[key], list) else \
                [schema[key]]  # items as a list: an older draft's tuple form
            for n, sub in enumerate(subs):
                check_schema_shape(sub, f"{where}.{key}" + (f"[{n}]" if len(subs) > 1 else ""), depth + 1)
    for key in SCHEMA_LISTS:
        if key in schema:
            if not isinstance(schema[key], list) or not schema[key]:
                raise ConfigError(f"{where}.{key}: must be a non-empty list of schemas")
            for n, sub in enumerate(schema[key]):
                check_schema_shape(sub, f"{where}.{key}[{n}]", depth + 1)


def _function_of(obj: Any, at: str, what: str, needs: str) -> tuple[Mapping[str, Any], str]:
    """A tool or a call, {"type"?: "function", "function": {"name", ...}}: its function and name; else one
    ConfigError naming `at` and the field (what: "tools" / "calls"; needs: what the function must hold)."""
    if not isinstance(obj, Mapping):
        raise ConfigError(f"{at}: must be an object, got {type(obj).__name__}")
    if obj.get("type", "function") != "function":
        raise ConfigError(f"{at}.type: only \"function\" {what} are supported, got {obj.get('type')!r}")
    function = obj.get("function")
    if not isinstance(function, Mapping):
        raise ConfigError(f"{at}.function: must be an object with {needs}")
    name = function.get("name")
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise ConfigError(f"{at}.function.name: must be 1-64 letters, digits, '_' or '-', got {name!r}")
    return function, name


def read_arguments(text: str, where: str) -> Any:
    """A call's arguments, sent as JSON text (OpenAI's form), as the value it holds ("" is {}); one ConfigError
    naming `where` for text that is not JSON."""
    try:
        return json.loads(text) if text.strip() else {}
    except ValueError as e:
        raise ConfigError(f"{where}: not JSON ({e})") from None
    except RecursionError:
        raise ConfigError(f"{where}: nested too deeply to read") from None


def read_calls(messages: Any) -> Any:
    """`messages` with every assistant message's `tool_calls` checked as OpenAI's API takes them, a list of
    {"id"?, "type"?: "function", "function": {"name", "arguments": the JSON text of an object ("" is {}), or the
    object}}, and their arguments read into that object (a new list; `messages` is not changed). A bad call is one
    ConfigError naming the message and the field, whatever the chat format (a Jinja template rendered a call without
    a name, and a Mistral format took arguments that are not JSON). Other fields are the client's and kept for the
    format (the openai SDK sends a parsed call's `parsed_arguments` back; a stream's calls carry an `index`)."""
    if not isinstance(messages, (list, tuple)):  # the messages' own check names it
        return messages
    out = []
    for i, m in enumerate(messages):
        calls = m.get("tool_calls") if isinstance(m, Mapping) else None
        if calls is not None:
            at = f"chat: message {i}: tool_calls"
            if isinstance(calls, (str, bytes, Mapping)) or not isinstance(calls, Sequence):
                raise ConfigError(f"{at}: must be a list of calls, got {type(calls).__name__}")
            read = []
            for j, call in enumerate(calls):
                where = f"{at}[{j}]"
                function, _ = _function_of(call, where, "calls", "a name and arguments")  # a type left out: a function
                arguments = function.get("arguments")
                if isinstance(arguments, str):
                    arguments = read_arguments(arguments, f"{where}.function.arguments")
                if not isinstance(arguments, Mapping):
                    raise ConfigError(f"{where}.function.arguments: must be a JSON object (the text of one, as OpenAI "
                                      f"sends it), got {type(arguments).__name__}")
                read.append({**call, "function": {**function, "arguments": arguments}})
            m = {**m, "tool_calls": read}
        out.append(m)
    return out


def read_tool_calls(token_ids: Sequence[int], tokenizer: Any, tokens: ToolTokens | None = None
                    ) -> ToolReply | None:
    """The reply's calls, read from its generated ids (an eos at the end is fine); None when the reply calls
    no tool or its calls do not parse (see the module docstring). tokens: the tokenizer's (tool_tokens)."""
    tokens = tokens or tool_tokens(tokenizer)
    ids = [int(i) for i in token_ids]
    if tokens is None or tokens.calls not in ids:
        return None
    first = ids.index(tokens.calls)
    groups: list[list[int]] = []
    for i in ids[first:]:
        if i == tokens.calls:
            groups.append([])
        else:
            groups[-1].append(i)
    calls: list[ToolCall] = []
    after = ""  # the tag form: text outside the tags after the first call (kept as content, not dropped)
    for group in groups:
        if tokens.end is not None:  # <tool_call>{...}</tool_call>
            if tokens.end not in group:
                return None
            rest = _continuing(tokenizer, group[group.index(tokens.end) + 1:])
            after += rest if rest.strip() else ""
            group = group[:group.index(tokens.end)]
        read = _named_call(group, tokenizer, tokens) if tokens.args is not None and tokens.args in group \
            else _json_calls(tokenizer.decode(group))
        if read is None:
            return None
        calls += read
    if not calls:
        return None
    text = tokenizer.decode(ids[:first]) + after
    return ToolReply(text or None, tuple(calls))  # as streamed: whitespace before a call is kept


def _continuing(tokenizer: Any, ids: list[int]) -> str:
    """The text of ids that continue a reply (a first word keeps its space: decoded after a word of text)."""
    if not ids:
        return ""
    lead = tokenizer.encode("a", bos=False)
    return str(tokenizer.decode([*lead, *ids]))[len(tokenizer.decode(lead)):]


def _named_call(group: list[int], tokenizer: Any, tokens: ToolTokens) -> list[ToolCall] | None:
    """`name[CALL_ID]id[ARGS]{...}` or `name[ARGS]{...}` (tekken v11 and later)."""
    assert tokens.args is not None
    at = group.index(tokens.args)
    head, body = group[:at], group[at + 1:]
    if tokens.call_id is not None and tokens.call_id in head:  # the model's own id: replaced (new_call_id)
        head = head[:head.index(tokens.call_id)]
    arguments = _object(tokenizer.decode(body))
    name = tokenizer.decode(head).strip()
    if arguments is None or not NAME.fullmatch(name):
        return None
    return [ToolCall(new_call_id(), name, arguments)]


def _json_calls(text: str) -> list[ToolCall] | None:
    """`[{"name", "arguments", "id"?}, ...]` (or one such object) after [TOOL_CALLS]."""
    try:
        value, end = json.JSONDecoder().raw_decode(text.strip())
    except ValueError:
        return None
    if text.strip()[end:].strip():  # text after the calls: not a reply of calls alone
        return None
    items = [value] if isinstance(value, dict) else value
    if not isinstance(items, list) or not items:
        return None
    calls = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not NAME.fullmatch(item["name"]):
            return None
        arguments = _object(item.get("arguments", {}))
        if arguments is None:
            return None
        calls.append(ToolCall(new_call_id(), item["name"], arguments))  # an "id" the model wrote is replaced
    return calls


def _object(value: Any) -> str | None:
    """A JSON object (or its JSON text: arguments written as a string) as normalized text (json.dumps), or None."""
    if isinstance(value, str):
        try:
            value = json.loads(value.strip())
        except ValueError:
            return None
    return json.dumps(value, ensure_ascii=False) if isinstance(value, dict) else None
