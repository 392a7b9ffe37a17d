"""Chat exactly as mistral-common encodes it, for the tokenizer files Mistral ships (v2, v3, v7, tekken).

    >>> from mixtrt.runtime.tokenizer import shipped_tokenizer_path      # mistral-common's data folder
    >>> tok = MistralCommonTokenizer(shipped_tokenizer_path().parent / "mistral_instruct_tokenizer_241114.model.v7")
    >>> chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    >>> tok.apply_chat_template(chat)                                    # needs `pip install 'mixtrt[mistral]'`
    [1, 16, 2507, 7585, 29491, 17, 3, 16127, 4]
    >>> tok.render_chat(chat)
    '<s>[SYSTEM_PROMPT]Be brief.[/SYSTEM_PROMPT][INST] Hi[/INST]'

Messages and tools are OpenAI / transformers dicts: `{"role": "user" | "system" | "assistant" | "tool",
"content": ...}`, assistant `tool_calls: [{"id", "type": "function", "function": {"name", "arguments"}}]`,
tool results `{"role": "tool", "tool_call_id", "content"}`, tools `[{"type": "function", "function":
{"name", "description", "parameters"}}]`; they go through `ChatCompletionRequest.from_openai` and
`MistralTokenizer.encode_chat_completion`, so the ids are mistral-common's own. These formats have no
assistant header: add_generation_prompt=True asks for a conversation ending with a user or tool message;
False also accepts one ending with an assistant message, closed with EOS (mistral-common's fine-tuning
encoding).

Text is encoded and decoded as mistral-common does: a sentencepiece file (`*.model.v3`, `.v7`) through the
sentencepiece `Tokenizer` (same ids, same text), a tekken file through mistral-common's Tekkenizer. Control
tokens never show in decoded or streamed text unless skip_special=False. mistral-common (pydantic, tiktoken,
jsonschema) is the `mistral` extra, imported when a tokenizer is loaded.
"""

from __future__ import annotations

import codecs
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mixtrt.runtime.chat_template import first_failing_message
from mixtrt.runtime.errors import ConfigError
from mixtrt.runtime.prompts import check_continue, check_flags, check_messages_text, check_text, decode_ids
from mixtrt.runtime.tokenizer import StreamDecoder, Tokenizer
from mixtrt.runtime.tool_calls import ToolTokens, mistral_ids, read_calls

EXTRA = "pip install 'mixtrt[mistral]'"


def _mistral_common(path: Path):
    try:
        from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
    except ImportError:
        raise ConfigError(f"{path.name}: this tokenizer is encoded by mistral-common, which is not installed "
                          f"({EXTRA})") from None
    return MistralTokenizer


def is_tekken_file(path: str | Path) -> bool:
    """mistral-common's rule for a tekken file: a .json whose name holds "tekken"."""
    path = Path(path)
    return path.suffix == ".json" and "tekken" in path.name


class TekkenStream:
    """Incremental decode for tekken (byte-level BPE): the concatenation of every `put()` and `flush()`
    equals `decode(all ids)`; no chunk ends inside a UTF-8 character; control tokens are invisible.

    mistral-common decodes each run of ordinary tokens as UTF-8 with errors="replace" and the control
    tokens between runs apart, so a run's held-back bytes are flushed when a control token arrives.
    """

    def __init__(self, tokenizer: MistralCommonTokenizer, skip_special: bool = True) -> None:
        self._tok = tokenizer
        self._skip_special = skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._shown = b""  # held-back bytes a text before this stream's showed already (mark_shown)

    def put(self, token_id: int) -> str:
        token_id = int(token_id)
        if token_id >= self._tok.vocab_size:  # a model row past the tokenizer's (a padded vocabulary): no text
            return ""
        if token_id not in self._tok._special_ids:
            return self._decode(self._tok._raw.id_to_byte_piece(token_id))
        text = self.flush()
        return text if self._skip_special else text + self._tok.id_to_piece(token_id)

    def flush(self) -> str:
        return self._decode(b"", final=True)

    def mark_shown(self) -> None:
        """As StreamDecoder.mark_shown: the bytes held back now were shown (as U+FFFD) by the text before."""
        self._shown = self._utf8.getstate()[0]

    def _decode(self, data: bytes, final: bool = False) -> str:
        if not self._shown:
            return self._utf8.decode(data, final=final)
        held = self._utf8.getstate()[0] + data  # the shown bytes in front
        text = self._utf8.decode(data, final=final)
        if not text:
            if final:
                self._shown = b""
            return text  # still held back: still the shown bytes in front
        shown, self._shown = self._shown, b""
        first = text[0].encode()
        if len(first) > len(shown) and held.startswith(first):
            return text  # the shown bytes began a character that is now complete
        return text[1:]  # the one U+FFFD (an incomplete sequence's maximal subpart) the text before showed


class MistralCommonTokenizer:
    """A mistral-common tokenizer file: chat through `encode_chat_completion`, text as mistral-common."""

    takes_text_parts = True  # mistral-common reads OpenAI's text-part lists (joined as its version joins them)

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ConfigError(f"{self.path}: no such tokenizer file")
        self._mistral_tokenizer = _mistral_common(self.path)
        try:
            self._chat = self._mistral_tokenizer.from_file(str(self.path))
        except Exception as e:  # mistral-common raises many kinds on a bad file; one line names the file
            raise ConfigError(f"{self.path}: mistral-common cannot load this tokenizer "
                              f"({type(e).__name__}: {' '.join(str(e).split())})") from None
        self._closed_chat = None  # the fine-tuning-mode tokenizer, loaded when first needed
        self._raw = self._chat.instruct_tokenizer.tokenizer
        self.version: str = str(self._raw.version.value)
        self.tekken = is_tekken_file(self.path)
        self._text = None if self.tekken else Tokenizer.load(self.path)
        self.vocab_size: int = int(self._raw.n_words)
        self.bos_id: int = int(self._raw.bos_id)
        self.eos_id: int = int(self._raw.eos_id)
        self._special_ids = frozenset(range(self._raw.num_special_tokens)) if self.tekken else frozenset()
        self._version = int(self.version[1:]) if self.version[1:].isdigit() else 0  # "v11" -> 11
        # before v7 an assistant message holds text or calls, never both (mistral-common refuses both): the text a
        # reply wrote before its calls is left out when the conversation comes back
        self._calls_without_text = 0 < self._version < 7

    def __repr__(self) -> str:
        return f"MistralCommonTokenizer({str(self.path)!r}, version={self.version!r}, vocab_size={self.vocab_size})"

    # ---- text --------------------------------------------------------------------------------------
    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        if self._text is not None:
            return self._text.encode(text, bos, eos)
        # tekken would write a lone surrogate as U+FFFD's bytes: refused as the sentencepiece files refuse it
        return [int(i) for i in self._raw.encode(check_text(text, "text"), bos=bos, eos=eos)]

    def encode_with_offsets(self, text: str, bos: bool = True) -> tuple[list[int], list[tuple[int, int]]]:
        """encode(text) and each token's character span (`Tokenizer.encode_with_offsets`); sentencepiece files
        only (the token and question-answering heads need the spans)."""
        if self._text is None:
            raise ConfigError(f"{self.path}: token spans need a sentencepiece tokenizer, and this is a tekken file")
        return self._text.encode_with_offsets(text, bos)

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        """Ids -> text as mistral-common decodes them (control tokens left out unless skip_special=False)."""
        ids = decode_ids(ids)
        if self._text is not None:
            return self._text.decode(ids, skip_special)
        stream = TekkenStream(self, skip_special)  # ids past the vocabulary (a padded model) have no text
        return "".join(stream.put(i) for i in ids) + stream.flush()

    def stream(self) -> StreamDecoder | TekkenStream:
        return self._text.stream() if self._text is not None else TekkenStream(self)

    def id_to_piece(self, i: int) -> str:
        """The piece of id i; "" for an id past the tokenizer's (a padded model vocabulary)."""
        if self._text is not None:
            return self._text.id_to_piece(i)
        return self._raw.id_to_piece(int(i)) if int(i) < self.vocab_size else ""

    def token_bytes(self, i: int) -> bytes | None:
        """The bytes an ordinary tekken token stands for (a piece of a UTF-8 character alone, where one is split
        over tokens), for logprobs' `bytes`; None for a control token, an id past the vocabulary, and a
        sentencepiece file (its byte pieces read as <0xE2>)."""
        i = int(i)
        if not self.tekken or i in self._special_ids or not 0 <= i < self.vocab_size:
            return None
        return bytes(self._raw.id_to_byte_piece(i))

    def tool_tokens(self) -> ToolTokens | None:
        """The tool-call control tokens ([TOOL_CALLS], [ARGS], [CALL_ID]) this file has (runtime/tool_calls.py)."""
        found = {}
        for name in ("[TOOL_CALLS]", "[ARGS]", "[CALL_ID]"):
            if self._text is not None:
                found[name] = self._text.piece_id(name)
            else:
                try:
                    found[name] = int(self._raw.get_special_token(name))
                except Exception:  # mistral-common raises its own kinds for a token the file does not have
                    found[name] = None
        calls = found["[TOOL_CALLS]"]
        if calls is None:
            return None
        if self._version < 11:  # name[ARGS] calls begin with v11
            return ToolTokens(calls)  # a file of an earlier version may list [ARGS] and still write JSON calls
        return ToolTokens(calls, found["[ARGS]"], found["[CALL_ID]"])

    # ---- chat --------------------------------------------------------------------------------------
    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                            tools: Sequence[Mapping[str, Any]] | None = None, *,
                            continue_final_message: bool = False) -> list[int]:
        """The conversation as mistral-common's `encode_chat_completion` ids (see the module docstring);
        continue_final_message: the last (assistant) message as mistral-common's `prefix`, left open for the model
        to continue."""
        check_flags(add_generation_prompt, continue_final_message)
        check_messages_text(messages)  # sentencepiece / tekken cannot take lone surrogates
        read_calls(messages)  # checked as the Jinja path checks them (mistral-common took arguments that are not
        # JSON); mistral-common is given the calls as sent (it writes argument text as it is)
        if continue_final_message:
            check_continue(messages, add_generation_prompt)
        chat = _checked(messages, add_generation_prompt)
        if tools is not None and (isinstance(tools, (str, Mapping)) or not all(isinstance(t, Mapping) for t in tools)):
            raise ConfigError("chat: tools must be a list of {'type': 'function', 'function': {...}} mappings")
        ids, error = self._attempt(chat, tools, continue_final_message)
        if error is None:
            return ids
        at = first_failing_message(
            len(chat), lambda n: self._attempt(chat[:n], tools, continue_final_message and n == len(chat))[1], error)
        raise ConfigError(f"chat ({self.path.name}, mistral-common {self.version}) failed at message {at} "
                          f"(role {chat[at]['role']!r}): {error}")

    def render_chat(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                    tools: Sequence[Mapping[str, Any]] | None = None, *, continue_final_message: bool = False) -> str:
        """The encoded conversation written out with its control tokens ("<s>[INST] Hi[/INST]"), for display."""
        ids = self.apply_chat_template(messages, add_generation_prompt, tools,
                                       continue_final_message=continue_final_message)
        return self.decode(ids, skip_special=False)

    def _attempt(self, chat: list[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None,
                 prefix: bool = False) -> tuple[list[int], str | None]:
        """(ids, None), or ([], the one-line error mistral-common gave). prefix: the last (assistant) message is
        left open (mistral-common's `prefix`)."""
        from mistral_common.exceptions import MistralCommonException
        from mistral_common.protocol.instruct.request import ChatCompletionRequest

        closed = chat[-1]["role"] == "assistant" and not prefix
        chat = [mistral_ids(m) for m in chat]
        if self._calls_without_text:
            chat = [_calls_only(m) for m in chat]
        if self.version == "v2":  # v2 shows a tool result with its function's name, which OpenAI's message lacks
            chat = _named_results(chat)
        try:
            request = ChatCompletionRequest.from_openai([dict(m) for m in chat],
                                                        [dict(t) for t in tools] if tools is not None else None)
            if prefix:  # from_openai does not set mistral-common's own field
                request.messages[-1].prefix = True
            encoded = self._closed().encode_chat_completion(request) if closed else \
                self._chat.encode_chat_completion(request)
        except KeyError as e:  # a field the message type needs (a tool message's tool_call_id, ...)
            return [], f"the message has no {e.args[0]!r} field" if e.args else "a field is missing"
        except (MistralCommonException, ValueError, TypeError, AssertionError) as e:
            if callable(getattr(e, "errors", None)) and getattr(e, "title", None):  # pydantic's: the field named
                return [], _validation_error(e)
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            return [], f"{type(e).__name__}: {' '.join(first.split())}"
        return [int(i) for i in encoded.tokens], None

    def _closed(self):
        """mistral-common in fine-tuning mode, which closes a final assistant message with EOS."""
        if self._closed_chat is None:
            from mistral_common.protocol.instruct.validator import ValidationMode

            self._closed_chat = self._mistral_tokenizer.from_file(str(self.path), mode=ValidationMode.finetuning)
        return self._closed_chat


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "dict", "list", "none"})


def _validation_error(e: Any) -> str:
    """A pydantic ValidationError from mistral-common's message types as one line: the type, then each field it
    refuses (a union's branches are one field) with pydantic's reason and the value given."""
    seen: dict[str, str] = {}
    for err in e.errors():
        path = ".".join(str(p) for p in err.get("loc", ())
                        if not (isinstance(p, str) and ("[" in p or p in _TYPE_TAGS)))
        if path not in seen:
            given = "" if err.get("type") == "missing" else f" (got {str(repr(err.get('input')))[:60]})"
            seen[path] = f"{path or 'value'}: {err.get('msg', 'invalid')}{given}"
    return f"{e.title}: {'; '.join(seen.values())}"


def _calls_only(message: Mapping[str, Any]) -> Mapping[str, Any]:
    """An assistant message with calls, without its text (the formats before v7 have no place for both)."""
    if message.get("role") != "assistant" or not message.get("tool_calls") or not message.get("content"):
        return message
    return {**message, "content": None}


def _named_results(chat: list[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Tool results without a `name` get the name of the call with their tool_call_id (as OpenAI's API sends them:
    the id only)."""
    names: dict[Any, Any] = {}
    out = []
    for m in chat:
        for call in m.get("tool_calls") or () if m.get("role") == "assistant" else ():
            if isinstance(call, Mapping) and isinstance(call.get("function"), Mapping):
                names[call.get("id")] = call["function"].get("name")
        if m.get("role") == "tool" and m.get("name") is None and names.get(m.get("tool_call_id")) is not None:
            m = {**m, "name": names[m.get("tool_call_id")]}
        out.append(m)
    return out


def _checked(messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool) -> list[Mapping[str, Any]]:
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence) or not messages:
        raise ConfigError("chat: messages must be a non-empty list of {'role': ..., 'content': ...} mappings")
    for n, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str):
            raise ConfigError(f"chat: message {n} must be a mapping with a string 'role', got {m!r}")
    if add_generation_prompt and messages[-1]["role"] == "assistant":
        raise ConfigError(f"chat: message {len(messages) - 1} is the assistant's: with add_generation_prompt=True "
                          "the conversation ends with a user or tool message (the model writes the next turn)")
    return list(messages)
