"""Prompts as users give them (text, token ids, batches of either) -> lists of token ids, checked.

    >>> normalize_prompts([[1, 5], [1, 7, 8]], tokenizer=None, vocab_size=10)
    [[1, 5], [1, 7, 8]]
    >>> normalize_prompts([1, 5], tokenizer=None, vocab_size=10)   # one tokenized prompt
    [[1, 5]]
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Mapping, Sequence, Set
from pathlib import Path
from typing import Any

import numpy as np

from mixtrt.runtime.errors import ConfigError, first_line

Prompts = str | Sequence[str] | Sequence[int] | Sequence[Sequence[int]] | np.ndarray


def is_token_id(t: Any) -> bool:
    """An integer (numpy's too), not a bool: what a token id may be before its range is checked."""
    return isinstance(t, (int, np.integer)) and not isinstance(t, bool)


def decode_ids(ids: Any) -> list[int]:
    """A tokenizer's decode input: a sequence of integer ids >= 0 as plain ints. Anything an integer converts from
    exactly (`__index__`: int, numpy integers, 0-d integer arrays and tensors) is an id; floats, strings, bools and
    negative ids are ConfigErrors (int() would truncate 1.7 or read "17"), and so are unordered collections."""
    if (isinstance(ids, (str, bytes, bytearray, Set, Mapping)) or not isinstance(ids, Iterable)
            or (hasattr(ids, "ndim") and ids.ndim != 1)):
        raise ConfigError(f"decode takes a sequence of token ids (integers), got {type(ids).__name__}"
                          + (f" of {ids.ndim} dimensions" if hasattr(ids, "ndim") else ""))
    out = []
    for t in ids:
        try:
            if isinstance(t, (bool, np.bool_)):
                raise TypeError
            i = operator.index(t)
        except TypeError:
            raise ConfigError(f"decode takes token ids (integers), got {t!r} ({type(t).__name__})") from None
        if i < 0:
            raise ConfigError(f"token id {i} is negative")
        out.append(i)
    return out


def as_list(value: Any, what: str) -> Any:
    """An array-like (a numpy array, a torch tensor: anything with `__array__` and `tolist`) as the nested list it
    holds; anything else as given."""
    if isinstance(value, (str, bytes, Sequence)) or not (hasattr(value, "__array__") and hasattr(value, "tolist")):
        return value
    try:
        return value.tolist()
    except Exception as e:  # an array library's own error
        raise ConfigError(f"{what}: cannot read the {type(value).__name__} as a list: {first_line(e)}") from None


def _not_an_id(t: Any) -> bool:
    """A number that is not a token id (a float, a bool): a token-id list holding it is refused, item named."""
    return isinstance(t, (float, bool, np.floating, np.bool_))


def _row_ids(p: Sequence[Any], where: str) -> list[int]:
    bad = next((k for k, t in enumerate(p) if not is_token_id(t)), None)
    if bad is not None:
        shown = repr(p[bad])
        shown = shown if len(shown) <= 40 else shown[:37] + "..."
        raise ConfigError(f"{where}: token ids must be integers; item {bad} is a {type(p[bad]).__name__} ({shown})")
    return [int(t) for t in p]


def normalize_prompts(prompts: Prompts, tokenizer: Any, vocab_size: int, name: str | None = None
                      ) -> list[list[int]]:
    """A list of token-id lists: a str, a list of str, one token-id list or a list of them (text is encoded
    with BOS); numpy arrays and torch tensors of ids as the lists they hold. Empty prompts, non-integer ids and
    ids outside [0, vocab_size) are ConfigErrors naming the prompt ("prompt i", or `name` for a call that takes
    one sequence of ids)."""
    prompts = as_list(prompts, name or "prompts")
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, Sequence) or isinstance(prompts, bytes):
        raise ConfigError(f"prompts must be a str, a list of str, a token-id list or a list of them, got "
                          f"{type(prompts).__name__}")
    if len(prompts) == 0:
        raise ConfigError("prompts is empty: give a str, a list of str, a token-id list or a list of them")
    batch: Sequence[Any]
    if any(is_token_id(p) or _not_an_id(p) for p in prompts):  # one tokenized prompt
        batch = [prompts]
    else:
        batch = [as_list(p, name or f"prompt {i}") for i, p in enumerate(prompts)]
        if len({isinstance(p, str) for p in batch}) > 1:
            raise ConfigError("the prompts list mixes text and token-id lists: give a list of str or a list of "
                              "token-id lists")
    rows = []
    for i, p in enumerate(batch):
        where = name or f"prompt {i}"
        if isinstance(p, str):
            if not p:
                raise ConfigError(f"{where} is empty")
            check_text(p, where)
            ids = list(tokenizer.encode(p, bos=True, eos=False))
        elif isinstance(p, Sequence) and not isinstance(p, bytes):
            ids = _row_ids(p, where)
        else:
            raise ConfigError(f"{where}: expected a str or a list of token ids, got {type(p).__name__}")
        if not ids:
            raise ConfigError(f"{where} is empty")
        message = outside_vocab(ids, vocab_size, f"{where}: token ids", shown=5)
        if message:
            raise ConfigError(message)
        rows.append(ids)
    return rows


def outside_vocab(ids: Iterable[int], vocab_size: int, what: str, shown: int | None = 8) -> str | None:
    """The message for token ids outside [0, vocab_size) (the first `shown` of them and how many more, all with
    None), naming `what`; None when every id is inside.

    >>> outside_vocab([3, 70, -1], 64, "stop_token_ids: ids")
    'stop_token_ids: ids [70, -1] outside the vocabulary [0, 64)'
    """
    bad = [t for t in ids if not 0 <= t < vocab_size]
    more = f" (and {len(bad) - shown} more)" if shown is not None and len(bad) > shown else ""
    return f"{what} {bad[:shown]}{more} outside the vocabulary [0, {vocab_size})" if bad else None


MAX_TEXT_FILE_BYTES = 256 << 20  # a prompt or calibration file; more is a mistake (an endless pipe, the wrong file)


def text_file_problem(path: Path) -> str | None:
    """Why `path` cannot be a text file to read (None: it can be tried): no such file, a directory, a device."""
    path = Path(path)
    if path.is_dir():
        return "a directory, not a text file"
    if not path.exists():
        return "no such file"
    if path.is_char_device() or path.is_block_device() or path.is_socket():
        return "not a regular file (a device or a socket)"
    return None


def read_text_file(path: Path, what: str, limit: int = MAX_TEXT_FILE_BYTES) -> str:
    """The UTF-8 text of the file at `path` (a pipe or a FIFO too), or a ConfigError naming `what` (the option) and
    the problem: no such file, a directory, a device, over `limit` bytes, not UTF-8 (and where), or the system's
    reason."""
    path = Path(path)
    problem = text_file_problem(path)
    if problem:
        raise ConfigError(f"{what} {path}: {problem}")
    try:
        with open(path, "rb") as f:
            return read_text_stream(f, f"{what} {path}", limit)
    except OSError as e:
        raise ConfigError(f"{what} {path}: {(e.strerror or str(e)).lower()}") from None


def read_text_stream(stream: Any, where: str, limit: int = MAX_TEXT_FILE_BYTES) -> str:
    """The UTF-8 text (a leading BOM dropped) of a binary stream (a file, stdin) of at most `limit` bytes, or a
    ConfigError starting with `where` (the option and its file): over the limit, or not UTF-8 (and where)."""
    data = stream.read(limit + 1)
    if len(data) > limit:
        raise ConfigError(f"{where}: over {limit >> 20} MiB, more than a text file for this should be")
    try:  # a leading byte-order mark (some editors write one) is the encoding's signature, not text: dropped
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{where}: not UTF-8 ({e.reason} at byte {e.start})") from None


def check_text(text: str, what: str) -> str:
    """`text` if it can be written as UTF-8, else a ConfigError naming `what` and the first bad character (a
    lone surrogate: what Python makes of invalid UTF-8 bytes on the command line, or half a UTF-16 pair).

    >>> check_text("caf\\u00e9", "prompt 0")
    'café'
    >>> check_text("a\\udcff", "--prompt")
    Traceback (most recent call last):
    ...
    mixtrt.runtime.errors.ConfigError: --prompt is not valid text: character 1 is '\\udcff', a lone surrogate ...
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ConfigError(f"{what} is not valid text: character {e.start} is {text[e.start]!r}, a lone surrogate "
                          "(invalid UTF-8 bytes, or half of a UTF-16 pair)") from None
    return text


def check_strings(value: Any, where: str) -> None:
    """Every string in a JSON-like value (mapping keys too, at any depth) is valid text (check_text); else one
    ConfigError naming the first bad one's path, in the value's own order (`tools[0].function.description`).
    Iterative: any depth, no recursion limit."""
    todo = [(value, where)]
    while todo:
        item, at = todo.pop()
        if isinstance(item, str):
            check_text(item, at)
        elif isinstance(item, Mapping):
            for key in item:
                if isinstance(key, str):
                    check_text(key, f"{at} key")
            todo.extend((sub, f"{at}.{key}") for key, sub in list(item.items())[::-1])
        elif isinstance(item, (list, tuple)):
            todo.extend((item[i], f"{at}[{i}]") for i in reversed(range(len(item))))


def check_messages_text(messages: Any) -> None:
    """`messages` is a list (or tuple) and every string in it (contents, names, tool-call arguments) is valid
    text; else one ConfigError naming the message and the field. Items that are not mappings are left to the
    chat format's own checks (they name the message)."""
    if not isinstance(messages, (list, tuple)):  # a str would be read as messages of one character each
        raise ConfigError("chat: messages must be a list of mappings like {'role': 'user', 'content': '...'}, got "
                          f"{type(messages).__name__}")
    for n, message in enumerate(messages):
        if isinstance(message, Mapping):
            for key, value in message.items():  # "chat: message 0 content[1].text"
                check_strings(value, f"chat: message {n} {key}")


def check_flags(add_generation_prompt: Any, continue_final_message: Any) -> None:
    """Both chat flags are bools: transformers' `apply_chat_template(conversation, tools, ...)` takes `tools` second,
    where ours takes `add_generation_prompt`, so a list given there is a mistake, not a true flag."""
    for name, value in (("add_generation_prompt", add_generation_prompt),
                        ("continue_final_message", continue_final_message)):
        if not isinstance(value, bool):
            raise ConfigError(f"chat: {name} must be True or False, got {type(value).__name__} (pass tools by "
                              "keyword: tools=[...])")


def check_continue(messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool) -> None:
    """continue_final_message's conditions, as transformers states them: the last message is the assistant's
    (the text the model continues) and no generation prompt follows it."""
    if add_generation_prompt:
        raise ConfigError("chat: continue_final_message and add_generation_prompt cannot both be set (the "
                          "assistant's last message is continued, not answered)")
    if not messages or not isinstance(messages[-1], Mapping) or messages[-1].get("role") != "assistant":
        raise ConfigError("chat: continue_final_message needs the conversation to end with the assistant's message "
                          "(the text the model continues)")
