"""OpenAI's logprobs objects from the Engine's arrays: completions' (`tokens`, `token_logprobs`, `top_logprobs`,
`text_offset`; with echo, the prompt's first) and chat's (`content`: token, logprob, bytes, top_logprobs).

    texts = TokenTexts(tokenizer)
    completion_logprobs(texts, [415, 2936], [-0.5, -1.2], None, 0, 0)   # {"tokens": [" The", " capital"], ...}
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from mixtrt.runtime.generation import dropped_front, primed_stream


class TokenTexts:
    """A token's text and bytes for logprobs (cached per id): the piece with the word marker as a space (a tekken
    token: the bytes it stands for); bytes that are not UTF-8 alone (a byte piece <0xE2>, a tekken token holding
    part of a character) become "bytes:\\xe2", as vLLM writes them."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.cache: dict[int, tuple[str, bytes]] = {}
        self.fronts: dict[int, str] = {}
        self._bytes = getattr(tokenizer, "token_bytes", None)

    def __call__(self, token: int) -> tuple[str, bytes]:
        if token in self.cache:
            return self.cache[token]
        data = self._bytes(token) if self._bytes is not None else None
        if data is None:
            piece = self.tokenizer.id_to_piece(token)
            m = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece)
            data = bytes([int(m[1], 16)]) if m else piece.replace("\u2581", " ").encode("utf-8", "surrogatepass")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            text = "bytes:" + "".join(f"\\x{b:02x}" for b in data)
        self.cache[token] = (text, data)
        return text, data

    def front(self, token: int) -> str:
        """What a new message's text leaves out in front of this token's text had it come first (a sentencepiece
        word's dummy-prefix space, the row's rule: a fresh stream decoder's output against the token's text);
        "" where nothing or more than whitespace would go."""
        if token not in self.fronts:
            text = self(token)[0]
            decoder = self.tokenizer.stream()
            cut = dropped_front(text, decoder.put(token) + decoder.flush())
            self.fronts[token] = cut if cut.isspace() else ""
        return self.fronts[token]


def top_dict(texts: TokenTexts, token: int, logprob: float, top: Any, t: int, k: int) -> dict[str, float]:
    d: dict[str, float] = {}
    if top is not None:
        for a, v in zip(top[0][t][:k], top[1][t][:k], strict=True):
            d.setdefault(texts(int(a))[0], float(v))
    d.setdefault(texts(token)[0], float(logprob))
    return d


class TextOffsets:
    """Where each token's text starts in the text a response returns (`text_offset`), by replaying the tokenizer's
    stream decoder over the ids, so offsets index the returned text itself: a control token (BOS) adds nothing, a
    word's leading space is where the text has one, the bytes of one character share its offset.

        TextOffsets(tokenizer)(prompt_ids)                       # the echoed prompt, from 0
        TextOffsets(tokenizer, prompt_ids, len(echo))(gen_ids)   # the continuation, after the echo (or from 0)
    """

    def __init__(self, tokenizer: Any, context: Sequence[int] = (), start: int = 0) -> None:
        self.stream = primed_stream(tokenizer, context) if len(context) else tokenizer.stream()
        self.position = start
        self.pieces: list[str] = []  # the text each token added, in order

    def __call__(self, ids: Sequence[int]) -> list[int]:
        out = []
        for token in ids:
            out.append(self.position)
            self.pieces.append(self.stream.put(int(token)))
            self.position += len(self.pieces[-1])
        return out


def completion_logprobs(texts: TokenTexts, ids: Sequence[int], lps: Any, top: Any, k: int,
                        offsets: list[int]) -> dict[str, Any]:
    return {"tokens": [texts(t)[0] for t in ids], "token_logprobs": [float(x) for x in lps],
            "top_logprobs": [top_dict(texts, t, lps[n], top, n, k) for n, t in enumerate(ids)],
            "text_offset": offsets}


def prompt_logprobs(texts: TokenTexts, prompt: list[int], lps: Any, top: Any, k: int) -> dict[str, Any]:
    """The prompt's tokens with log p(prompt[t] | prompt[:t]); the first token has none (None). The first word's
    leading space that the prompt's text leaves out (the tokenizer's dummy prefix: "▁It" starts "It is") is taken
    off its token and the alternatives at its position, as vLLM's incremental detokenizer shows them, so the
    tokens after the first join to the echoed text."""
    offsets = TextOffsets(texts.tokenizer)
    at = offsets(prompt)
    rest = completion_logprobs(texts, prompt[1:], lps, top, k, at[1:])
    tokens = [texts(prompt[0])[0]] + rest["tokens"]
    tops = [None] + rest["top_logprobs"]
    # up to the first token the text shows: a dummy prefix alone ("▁" before "▁Paris", "\n" or a byte-spelled
    # character) shows nothing, so its token is "" too
    shown = next((n for n, piece in enumerate(offsets.pieces) if piece), len(prompt) - 1)
    for n in range(shown + 1):
        cut = dropped_front(tokens[n], offsets.pieces[n])
        if cut.isspace():  # "" is not
            tokens[n] = offsets.pieces[n]
            if tops[n] is not None:
                cut_top: dict[str, float] = {}
                for key, value in tops[n].items():  # most likely first: a key the cut makes equal keeps the first
                    cut_top.setdefault(key[len(cut):] if key.startswith(cut) else key, value)
                tops[n] = cut_top
    return {"tokens": tokens, "token_logprobs": [None] + rest["token_logprobs"], "top_logprobs": tops,
            "text_offset": at}


def merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    return {key: a[key] + b[key] for key in a}


def chat_logprobs(texts: TokenTexts, ids: list[int], lps: Any, top: Any, k: int, front: str = "",
                  first: bool = False) -> dict[str, Any]:
    """OpenAI's chat logprobs of a message's tokens. front: what the message's text leaves out in front of its first
    tokens' text (`Row.front`, a first word's leading space), taken off them and off the alternatives at their
    positions, so the tokens' text and bytes join to the message's content. first: ids[0] is a new message's first
    token; each alternative there reads as it would had it been chosen (its own front taken off, `TokenTexts.front`),
    whichever token was."""
    content = []
    for n, t in enumerate(ids):
        text, data = texts(t)
        cut = ""
        if front:
            head = front[:len(text)]
            if text.startswith(head):
                cut, front = head, front[len(head):]
                text, data = _without(cut, text, data)
            else:
                front = ""
        alts = []
        if top is not None:
            for a, v in zip(top[0][n][:k], top[1][n][:k], strict=True):
                at, ad = _without(texts.front(int(a)) if first and n == 0 else cut, *texts(int(a)))
                alts.append({"token": at, "logprob": float(v), "bytes": list(ad)})
        content.append({"token": text, "logprob": float(lps[n]), "bytes": list(data), "top_logprobs": alts})
    return {"content": content}


def _without(cut: str, text: str, data: bytes) -> tuple[str, bytes]:
    """A token's text and bytes with `cut` taken off its front (where it starts with it)."""
    if not cut or not text.startswith(cut):
        return text, data
    return text[len(cut):], data[len(cut.encode("utf-8")):]
