"""Jinja chat templates rendered the way transformers' `apply_chat_template` renders them (no transformers).

    >>> t = ChatTemplate("{{ bos_token }}{% for m in messages %}[{{ m.role }}] {{ m.content }}\\n{% endfor %}",
    ...                  {"bos_token": "<s>"})
    >>> t.render([{"role": "user", "content": "Hi"}])
    '<s>[user] Hi\\n'

The environment is transformers' (5.x): a jinja2 `ImmutableSandboxedEnvironment` with trim_blocks and
lstrip_blocks, the loopcontrols extension and a `{% generation %}` block that renders its body; the
filter `tojson` is json.dumps (no HTML escaping, ensure_ascii off); the globals are `raise_exception`,
`strftime_now`, a `dict` constructor and a `namespace` that refuses underscore names. The template sees
`messages`, `tools`, `documents` (None unless given), `add_generation_prompt`, the special tokens of
tokenizer_config.json (`bos_token`, `eos_token`, ...) and any extra keyword. Messages are first made
plain data (dicts, lists, str, numbers; keys whose value is None dropped; any other object becomes the
string "<TypeName>"), and a message's reasoning given as `reasoning_content`, `thinking` or `reasoning`
is visible under `reasoning_content` and `thinking`, as transformers does.

Errors are one line (ConfigError): a template that does not compile names where it came from; one that
fails or calls raise_exception names the message it failed at (see `first_failing_message`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any, TypeVar

import jinja2
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace

from mixtrt.runtime.errors import ConfigError

T = TypeVar("T")

# Where a message's reasoning may be given; the first two are the names templates read.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def select_template(templates: Mapping[str, T], tools: Sequence[Any] | None = None) -> T:
    """The template transformers picks from a checkpoint's named templates: "tool_use" when tools are
    given and it exists, else "default"."""
    if tools is not None and "tool_use" in templates:
        return templates["tool_use"]
    if "default" in templates:
        return templates["default"]
    raise ConfigError(f"the checkpoint has chat templates {sorted(templates)} but none named 'default'")


def first_failing_message(count: int, fails: Callable[[int], str | None], error: str) -> int:
    """Index of the message a conversation breaks at: the first n with fails(messages[:n + 1]) giving the
    same error as the whole conversation; the last message when no shorter prefix reproduces it.

    fails(k) renders the first k messages and returns the error text, or None when they render.
    """
    for n in range(1, count):
        if fails(n) == error:
            return n - 1
    return count - 1


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _plain(value: Any) -> Any:
    """JSON-like plain data only, so the sandbox sees no object with methods of its own."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if hasattr(value, "item") and callable(value.item) and getattr(value, "shape", None) == ():  # numpy scalar
        return _plain(value.item())
    return f"<{type(value).__name__}>"


def _message(n: int, message: Any) -> dict[str, Any]:
    if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
        raise ConfigError(f"chat: message {n} must be a mapping with a string 'role', got {message!r}")
    plain = {k: _plain(v) for k, v in message.items() if v is not None}
    reasoning = next((plain[k] for k in _REASONING_FIELDS if k in plain), None)
    if reasoning is not None:
        plain = {"thinking": reasoning, **plain, "reasoning_content": reasoning}
    return plain


class _Generation(Extension):
    """`{% generation %}...{% endgeneration %}` marks the assistant's text; rendering keeps the body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Callable[[], str]) -> str:
        return caller()


class _Namespace(Namespace):
    """jinja2's namespace without underscore attributes (no reach into Python internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # jinja2's signature trick: namespace(self=...) works
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set the namespace attribute {name!r}")


class _Dict:
    """`dict(...)` and `dict.fromkeys(...)` in a template, without handing it the dict type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


MAX_REPEAT = 1 << 20  # items a template's `*` may make of a string or list ('=' * 80 is fine; 'x' * 10**10 is not)
MAX_POWER_BITS = 4096  # bits of an integer a template's `**` may make


class _Sandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox, with `*` and `**` bounded: a 30-byte template must not build gigabytes. The
    sandbox also keeps Jinja from folding such constants when the template compiles (an intercepted operator is
    never folded), so the bound holds at load time as at render time."""

    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > MAX_REPEAT:
                    raise jinja2.exceptions.SecurityError(
                        f"the template repeats a {type(seq).__name__} of {len(seq)} {n} times (more than "
                        f"{MAX_REPEAT} items)")
        if operator == "**" and isinstance(left, int) and isinstance(right, int) and right > 0 \
                and abs(left) > 1 and right * abs(left).bit_length() > MAX_POWER_BITS:
            raise jinja2.exceptions.SecurityError(f"the template raises {left} to the power {right} (an integer "
                                                  f"of more than {MAX_POWER_BITS} bits)")
        return super().call_binop(context, operator, left, right)


def _environment() -> ImmutableSandboxedEnvironment:
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_Dict(),
                       namespace=_Namespace)
    return env


class ChatTemplate:
    """One compiled Jinja chat template with the special tokens it is rendered with."""

    def __init__(self, source: str, special_tokens: Mapping[str, str] | None = None,
                 origin: str = "chat_template") -> None:
        if not isinstance(source, str) or not source:
            raise ConfigError(f"{origin}: the chat template must be a non-empty string")
        self.source = source
        self.origin = origin
        self.special_tokens = dict(special_tokens or {})
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise ConfigError(f"{origin}: the chat template does not compile: {_one_line(e.message or '')} "
                              f"(line {e.lineno})") from None

    def __repr__(self) -> str:
        return f"ChatTemplate(origin={self.origin!r}, {len(self.source)} characters)"

    def render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
               tools: Sequence[Mapping[str, Any]] | None = None, documents: Sequence[Mapping[str, Any]] | None = None,
               **kwargs: Any) -> str:
        """The conversation as the text transformers' `apply_chat_template(..., tokenize=False)` gives."""
        if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence) or not messages:
            raise ConfigError("chat: messages must be a non-empty list of {'role': ..., 'content': ...} mappings")
        if tools is not None and not all(isinstance(t, Mapping) for t in tools):
            raise ConfigError("chat: tools must be JSON-schema mappings")
        try:
            chat = [_message(n, m) for n, m in enumerate(messages)]
            variables = {**self.special_tokens, **_plain(kwargs), "tools": _plain(tools),
                         "documents": _plain(documents), "add_generation_prompt": bool(add_generation_prompt)}
        except RecursionError:
            raise ConfigError("chat: a message or the tools are nested too deeply to render") from None
        text, error = self._attempt(chat, variables)
        if error is None:
            return text
        at = first_failing_message(len(chat), lambda n: self._attempt(chat[:n], variables)[1], error)
        raise ConfigError(f"chat template ({self.origin}) failed at message {at} (role {chat[at]['role']!r}): {error}")

    def _attempt(self, chat: list[dict[str, Any]], variables: dict[str, Any]) -> tuple[str, str | None]:
        """(the rendered text, None), or ("", the one-line error)."""
        try:
            return self._template.render(messages=chat, **variables), None
        except jinja2.exceptions.TemplateError as e:  # raise_exception, undefined names, sandbox refusals
            kind = "" if type(e) is jinja2.exceptions.TemplateError else f"{type(e).__name__}: "
            return "", kind + _one_line(e.message or "")
        except (TypeError, ValueError, KeyError, IndexError, AttributeError, ArithmeticError) as e:
            return "", f"{type(e).__name__}: {_one_line(e)}"
        except RecursionError:
            return "", "RecursionError: the template recurses too deeply"
        except MemoryError:
            return "", "MemoryError: the template builds more than fits in memory"
