"""A sentencepiece tokenizer driven by the checkpoint's Jinja chat template, with the ids transformers gives.

    tok = JinjaChatTokenizer(Tokenizer.load("ckpt/tokenizer.model"), ChatTemplate(template, special_tokens))
    tok.render_chat([{"role": "user", "content": "Hi"}])           # the template's text: '<s>[INST] Hi[/INST]'
    tok.apply_chat_template([{"role": "user", "content": "Hi"}])   # [1, 3, 16127, 4] with the v3 vocabulary:
                                                                   # [INST] and [/INST] are single ids

The rendered text is tokenized as transformers 5.x tokenizes it (`tokenizer(text, add_special_tokens=False)`
of a LlamaTokenizer built from the same tokenizer.model and tokenizer_config.json):

1. Added tokens are cut out first, leftmost-longest, each one id: sentencepiece's control, user-defined and
   unknown pieces (`<s>`, `</s>`, `[INST]`, `[TOOL_CALLS]`, ...) and the `added_tokens_decoder` entries of
   tokenizer_config.json, which may lie past the sentencepiece vocabulary (ChatML's `<|im_start|>` = 32001
   on a 32000-piece model). `lstrip` / `rstrip` take the whitespace beside the token, `single_word`
   matches only outside words.
2. Each stretch of text between them is encoded by sentencepiece without its own dummy prefix; the "▁"
   prefix is added as transformers 5 adds it to a checkpoint's tokenizer built from tokenizer.model:
   `prepend_scheme` "always" (`legacy: true`, and transformers' default when the key is missing): to every
   stretch, one that starts with a space too (" [INST]" -> ▁ ▁[INST]: the legacy tokenizer.json of
   Mistral-7B-Instruct-v0.2 and Mixtral-8x7B-Instruct gives the same); "first" (`legacy: false`): only to text at
   the very start of the string, and not if it starts with a space; "never": not at all (also whatever the
   scheme when the sentencepiece model itself has no dummy prefix).

Runs of spaces split as sentencepiece splits them ("a  b" -> ▁a ▁ ▁b): transformers builds a checkpoint's BPE
merges from the piece scores and agrees (its LlamaTokenizer class alone, without the checkpoint's config.json,
merges them across words: ▁a ▁▁ b; plain text in `tokenizer.py` pins that divergence).

Decoding is sentencepiece's; an added token past the sentencepiece vocabulary decodes to its text unless
it is special (then to nothing, or to its text with skip_special=False), as transformers decodes it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from mixtrt.runtime.chat_format import PREPEND_SCHEMES, AddedToken, PrependScheme
from mixtrt.runtime.chat_template import ChatTemplate, select_template
from mixtrt.runtime.errors import ConfigError
from mixtrt.runtime.prompts import check_continue, check_flags, check_messages_text, check_text, decode_ids
from mixtrt.runtime.tokenizer import StreamDecoder, Tokenizer, sp_offsets
from mixtrt.runtime.tool_calls import ToolTokens, mistral_ids, read_calls

__all__ = ["AddedToken", "JinjaChatTokenizer", "PrependScheme"]
_SP_UNKNOWN, _SP_CONTROL, _SP_USER_DEFINED = 2, 3, 4  # sentencepiece ModelProto.SentencePiece.Type


def _without_dummy_prefix(path: Path) -> tuple[spm.SentencePieceProcessor, list[int], bool]:
    """The same model with `add_dummy_prefix` off, the piece types, and whether the model had the dummy prefix on,
    read from the model's protobuf."""
    proto = sentencepiece_model_pb2.ModelProto()  # type: ignore[attr-defined]
    proto.ParseFromString(path.read_bytes())
    types = [p.type for p in proto.pieces]
    dummy_prefix = bool(proto.normalizer_spec.add_dummy_prefix)
    proto.normalizer_spec.add_dummy_prefix = False
    sp = spm.SentencePieceProcessor()
    sp.LoadFromSerializedProto(proto.SerializeToString())
    return sp, types, dummy_prefix


_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "  # transformers' marker of where a continued message ends


class _Stream(StreamDecoder):
    """StreamDecoder that also passes added tokens past the sentencepiece vocabulary."""

    def __init__(self, tokenizer: JinjaChatTokenizer, skip_special: bool = True) -> None:
        super().__init__(tokenizer.text, skip_special)
        self._extra = tokenizer._extra

    def put(self, token_id: int) -> str:
        token = self._extra.get(int(token_id))
        if token is None:
            return super().put(token_id)
        if token.special and self.skip_special:
            return self.flush()
        return self.put_text(token.content)


class JinjaChatTokenizer:
    """encode / decode / stream as the sentencepiece `Tokenizer`; chat through the Jinja template."""

    takes_text_parts = False  # the server joins a message's text parts with newlines first, as vLLM does for templates

    def __init__(self, text: Tokenizer, templates: ChatTemplate | Mapping[str, ChatTemplate],
                 added_tokens: Sequence[AddedToken] = (), prepend_scheme: PrependScheme = "first") -> None:
        """templates: one template, or the checkpoint's named ones ("default", "tool_use", ...)."""
        if prepend_scheme not in PREPEND_SCHEMES:
            raise ConfigError(f"prepend_scheme must be one of {PREPEND_SCHEMES}, got {prepend_scheme!r}")
        self.text = text
        self.templates = {"default": templates} if isinstance(templates, ChatTemplate) else dict(templates)
        self.template = select_template(self.templates)
        self.path = text.path
        self._plain, types, dummy_prefix = _without_dummy_prefix(text.path)
        self.prepend_scheme: PrependScheme = prepend_scheme if dummy_prefix else "never"
        kinds = (_SP_UNKNOWN, _SP_CONTROL, _SP_USER_DEFINED)  # the pieces transformers makes added tokens
        added = {text.id_to_piece(i): AddedToken(i, text.id_to_piece(i)) for i, t in enumerate(types) if t in kinds}
        self._extra: dict[int, AddedToken] = {}
        for token in added_tokens:
            if token.id < text.vocab_size:
                if text.id_to_piece(token.id) != token.content:
                    raise ConfigError(f"added token {token.content!r} has id {token.id}, which is the piece "
                                      f"{text.id_to_piece(token.id)!r} in {text.path.name}")
            else:
                self._extra[token.id] = token
            added[token.content] = token
        self.added_tokens = tuple(sorted(added.values(), key=lambda t: t.id))
        self.vocab_size: int = max([text.vocab_size, *(i + 1 for i in self._extra)])
        gaps = sorted(set(range(text.vocab_size, self.vocab_size)) - set(self._extra))
        if gaps:
            raise ConfigError(f"added tokens leave ids {gaps[:5]} between the sentencepiece vocabulary "
                              f"({text.vocab_size}) and {self.vocab_size} without a token")
        self._pattern, self._pattern_ids = _added_token_pattern(self.added_tokens)
        self._by_content = {t.content: t.id for t in self.added_tokens}
        specials = self.template.special_tokens
        self.bos_id: int = self._token_id(specials.get("bos_token"), text.bos_id)
        self.eos_id: int = self._token_id(specials.get("eos_token"), text.eos_id)

    def __repr__(self) -> str:
        return (f"JinjaChatTokenizer({str(self.path)!r}, vocab_size={self.vocab_size}, "
                f"template={self.template.origin!r})")

    def _token_id(self, content: str | None, default: int) -> int:
        if content is None:
            return default
        if content in self._by_content:
            return self._by_content[content]
        piece = self.text.piece_id(content)
        return default if piece is None else piece

    def tool_tokens(self) -> ToolTokens | None:
        """Mistral's tool-call tokens where the checkpoint has them as added tokens, else a ChatML fine-tune's
        `<tool_call>` / `</tool_call>` tags (runtime/tool_calls.py)."""
        calls = self._by_content.get("[TOOL_CALLS]")
        start, end = self._by_content.get("<tool_call>"), self._by_content.get("</tool_call>")
        sources = [t.source for t in self.templates.values()]
        # a vocabulary with both (a ChatML fine-tune of a v3 model): the form its template writes
        if start is not None and end is not None and (calls is None or (
                any("<tool_call>" in t for t in sources) and not any("[TOOL_CALLS]" in t for t in sources))):
            return ToolTokens(start, end=end)
        if calls is None:
            return None
        return ToolTokens(calls, self._by_content.get("[ARGS]"), self._by_content.get("[CALL_ID]"))

    # ---- text --------------------------------------------------------------------------------------
    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Plain text -> ids as transformers' `tokenizer(text)` gives them for text without added tokens: one
        stretch at the start of the string, prefixed by the checkpoint's rule (`legacy: false`: text that starts
        with a space gets no second one). Added tokens written in the text ("<s>", "[INST]") stay text."""
        text = check_text(text, "text")
        body = self.text.encode(text, bos=False) if self._prefixed(text, True) else self._plain.encode(text)
        return [self.bos_id] * bos + body + [self.eos_id] * eos

    def encode_with_offsets(self, text: str, bos: bool = True) -> tuple[list[int], list[tuple[int, int]]]:
        """encode(text) and each token's character span (`Tokenizer.encode_with_offsets`)."""
        if self._prefixed(text, True):
            ids, spans = self.text.encode_with_offsets(text, bos=False)
        else:
            ids, spans = sp_offsets(self._plain, text)
        return [self.bos_id] * bos + ids, [(0, 0)] * bos + spans

    def _prefixed(self, stretch: str, first: bool) -> bool:
        """Whether a stretch of text gets the "▁" prefix (the module docstring): transformers' Metaspace adds it
        under "first" only where the text, its spaces already "▁", does not start with one."""
        return self.prepend_scheme == "always" or (self.prepend_scheme == "first" and first
                                                   and not stretch.startswith((" ", "\u2581")))

    def encode_special(self, text: str) -> list[int]:
        """Text that holds added tokens ("<s>[INST] Hi [/INST]") -> ids, as transformers'
        `tokenizer(text, add_special_tokens=False)`: each added token one id (see the module docstring)."""
        ids: list[int] = []
        at = 0
        for match in self._pattern.finditer(text) if self._pattern else ():
            ids += self._encode_stretch(text[at:match.start()], first=at == 0)
            ids.append(self._pattern_ids[(match.lastindex or 1) - 1])
            at = match.end()
        return ids + self._encode_stretch(text[at:], first=at == 0)

    def _encode_stretch(self, text: str, first: bool) -> list[int]:
        if not text:
            return []
        return self._plain.encode(" " + text if self._prefixed(text, first) else text)

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        """Ids -> text; control tokens are never shown unless skip_special=False."""
        ids = decode_ids(ids)
        # ids past the tokenizer's (a model whose embedding is padded beyond them) have no text, as in Tokenizer
        ids = [i for i in ids if i < self.vocab_size]
        if not any(i in self._extra for i in ids):
            return self.text.decode(ids, skip_special)
        stream = _Stream(self, skip_special)
        return "".join(stream.put(i) for i in ids) + stream.flush()

    def stream(self) -> StreamDecoder:
        return _Stream(self)

    def id_to_piece(self, i: int) -> str:
        token = self._extra.get(int(i))
        return token.content if token is not None else self.text.id_to_piece(i)

    # ---- chat --------------------------------------------------------------------------------------
    def render_chat(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                    tools: Sequence[Mapping[str, Any]] | None = None, *, continue_final_message: bool = False) -> str:
        """The template's text for the conversation (transformers' `apply_chat_template(tokenize=False)`).

        continue_final_message: the text ends where the last (assistant) message's content ends, so the model
        continues that message instead of closing it; found as transformers finds it (a tag appended to the
        content, the text cut before the tag's last occurrence, trailing spaces dropped where the template
        trimmed them)."""
        check_flags(add_generation_prompt, continue_final_message)
        # the assistant messages' calls checked (a template renders anything), their arguments as the objects a
        # client's JSON text holds: templates write them with `tojson`, which would write a string (vLLM parses them)
        messages = read_calls(messages)
        tokens = self.tool_tokens()
        if tokens is not None and tokens.end is None:  # Mistral's templates take 9-character call ids
            messages = [mistral_ids(m) if isinstance(m, Mapping) else m for m in messages]
        template = select_template(self.templates, tools)
        if not continue_final_message:
            return template.render(messages, add_generation_prompt=add_generation_prompt, tools=tools)
        check_continue(messages, add_generation_prompt)
        *head, last = messages
        final, tagged = last.get("content"), dict(last)
        if isinstance(final, str):
            tagged["content"] = final + _CONTINUE_TAG
        elif isinstance(final, (list, tuple)):  # content parts: the last text part is continued
            parts = [dict(part) if isinstance(part, Mapping) else part for part in final]
            texts = [n for n, part in enumerate(parts) if isinstance(part, dict) and isinstance(part.get("text"), str)]
            if not texts:
                raise ConfigError("chat: continue_final_message: the last message has no text to continue")
            final = parts[texts[-1]]["text"]
            parts[texts[-1]]["text"] = final + _CONTINUE_TAG
            tagged["content"] = parts
        else:
            raise ConfigError("chat: continue_final_message: the last message has no text content to continue")
        text = template.render([*head, tagged], add_generation_prompt=False, tools=tools)
        tag = _CONTINUE_TAG.strip()
        if final.strip() not in text or tag not in text:
            raise ConfigError("chat: continue_final_message: the chat template does not write the last message's "
                              "content as given, so there is no place to continue it from")
        at = text.rindex(tag)
        return text[:at] if text[at:at + len(_CONTINUE_TAG)] == _CONTINUE_TAG else text[:at].rstrip()

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                            tools: Sequence[Mapping[str, Any]] | None = None, *,
                            continue_final_message: bool = False) -> list[int]:
        """The conversation as ids: the rendered text through `encode_special`."""
        check_messages_text(messages)  # sentencepiece / tekken cannot take lone surrogates
        return self.encode_special(self.render_chat(messages, add_generation_prompt, tools,
                                                    continue_final_message=continue_final_message))


def _added_token_pattern(tokens: Sequence[AddedToken]) -> tuple[re.Pattern[str] | None, list[int]]:
    """One regex matching any added token, and the id of each of its groups (group n + 1 -> ids[n]).

    Longer tokens come first, so at each position the longest one matches (transformers' leftmost-longest).
    lstrip / rstrip take the whitespace on that side into the match; single_word needs non-word characters
    (or the ends of the text) on both sides.
    """
    alternatives, ids = [], []
    for t in sorted(tokens, key=lambda t: len(t.content), reverse=True):
        body = re.escape(t.content)
        if t.single_word:
            body = rf"(?<!\w){body}(?!\w)"
        alternatives.append((r"\s*" if t.lstrip else "") + f"({body})" + (r"\s*" if t.rstrip else ""))
        ids.append(t.id)
    return (re.compile("|".join(alternatives)) if alternatives else None), ids
