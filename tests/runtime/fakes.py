"""Fakes for the generation tests: a toy tokenizer over 46 byte pieces and a toy backend.

ToyBackend is a deterministic toy LM whose logits depend on the last 3 tokens, read back from a real
HostKVCache (ring slots when windowed, slot = position otherwise), and on the position: a chunking, row
mapping (move_rows) or position bug changes the tokens. It also enforces the Backend rules (S > 1 only
with b == 1, S <= capacity, no feeding past the cache or max positions) and counts the tokens it ran.
"""

import codecs

import numpy as np

from mixtrt.runtime.args import ModelArgs
from mixtrt.runtime.cache import HostKVCache

PIECES: list[bytes] = [b"<unk>", b"<s>", b"</s>"]
PIECES += [bytes([c]) for c in b"abcdefghijklmnopqrstuvwxyz"]  # 3..28
PIECES += [b" ", b".", b"\n", b"\xc3", b"\xa9", b"\xe2", b"\x82", b"\xac"]  # 29..36: bytes of e-acute, euro
PIECES += [b"the", b"ab", b"ing", b" and", b"st", b"op", b"ll", b"!", b"?"]  # 37..45
V = len(PIECES)
A, B, C3, A9, E2, X82, AC = 3, 4, 32, 33, 34, 35, 36
# with UTF8_CHAIN the toy LM strongly prefers: a -> é (2 byte tokens) -> b -> € (3 byte tokens) -> a
UTF8_CHAIN = {A: C3, C3: A9, A9: B, B: E2, E2: X82, X82: AC, AC: A}


class ToyTokenizer:
    bos_id, eos_id, vocab_size = 1, 2, V

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        data, ids = text.encode(), [1] if bos else []
        while data:
            best = max((i for i in range(3, V) if data.startswith(PIECES[i])), key=lambda i: len(PIECES[i]),
                       default=0)
            ids.append(best)
            data = data[len(PIECES[best]) if best else 1:]
        return ids + [2] * eos

    def decode(self, ids: list[int]) -> str:
        return b"".join(PIECES[i] for i in ids if i >= 3).decode("utf-8", "replace")

    def id_to_piece(self, i: int) -> str:
        return PIECES[i].decode("latin-1")

    def stream(self) -> "ToyStreamDecoder":
        return ToyStreamDecoder()

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        ids = [1]
        for m in messages:
            ids += self.encode(f"{m['role']} {m['content']}\n", bos=False)
        return ids + (self.encode("the", bos=False) if add_generation_prompt else [])


class ToyStreamDecoder:
    def __init__(self) -> None:
        self.utf8 = codecs.getincrementaldecoder("utf-8")("replace")

    def put(self, token_id: int) -> str:
        return self.utf8.decode(PIECES[token_id]) if token_id >= 3 else ""

    def flush(self) -> str:
        return self.utf8.decode(b"", final=True)


class ToyBackend:
    def __init__(self, capacity: int = 6, windowed: bool = True, max_positions: int = 512,
                 chain: dict[int, int] | None = None, seed: int = 0, mixed: bool = False) -> None:
        self.args = ModelArgs(architecture="MistralForCausalLM", vocab_size=V, hidden_size=16, intermediate_size=32,
                              num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1, head_dim=2,
                              sliding_window=4 if windowed else None, max_position_embeddings=max_positions)
        self.capacity, self.windowed, self.max_positions = capacity, windowed, max_positions
        rng = np.random.default_rng(seed)
        self.emb, self.pos = rng.standard_normal((V, 16)), rng.standard_normal((5, 16))
        self.out = rng.standard_normal((16, V))
        self.chain = chain or {}
        self.calls: list[tuple[int, int, int]] = []  # (b, S, start_row)
        self.last_only: list[bool] = []  # per call
        # mixed: step_mixed runs the decode rows and a prompt chunk in one call (as onnxruntime's mixed graph);
        # each of its two halves is also in `calls`, with True in `in_mixed`
        self.mixed_steps = mixed
        self.mixed_calls: list[tuple[int, int]] = []  # (b, S)
        self.in_mixed: list[bool] = []  # per call
        self._mixing = False

    def new_cache(self, batch_size: int) -> HostKVCache:
        return HostKVCache(1, batch_size, 1, self.capacity, 1)

    def move_rows(self, cache: HostKVCache, rows: list[int]) -> None:
        cache.move_rows(rows)

    def slot(self, pos: int) -> int:
        return pos % self.capacity if self.windowed else pos

    def step(self, cache: HostKVCache, input_ids: np.ndarray, start_row: int = 0, last_only: bool = False
             ) -> np.ndarray:
        b, s = input_ids.shape
        assert input_ids.dtype == np.int64 and (s == 1 or b == 1) and s <= self.capacity
        assert 0 <= start_row and start_row + b <= cache.batch_size
        self.calls.append((b, s, start_row))
        self.last_only.append(last_only)
        self.in_mixed.append(self._mixing)
        keys, out = cache.keys[0], np.empty((b, s, V), np.float32)
        for r in range(b):
            row = start_row + r
            for j in range(s):
                pos = int(cache.lengths[row])
                assert pos < self.max_positions, "fed past max positions"
                assert self.windowed or pos < self.capacity, "fed past a full linear cache"
                keys[row, 0, self.slot(pos), 0] = input_ids[r, j]
                cache.lengths[row] += 1
                history = [int(keys[row, 0, self.slot(pos - k), 0]) for k in range(3) if pos - k >= 0]
                h = sum(w * self.emb[t] for w, t in zip((1.0, 0.5, 0.25), history, strict=False)) + self.pos[pos % 5]
                out[r, j] = h @ self.out
                if history[0] in self.chain:
                    out[r, j, self.chain[history[0]]] += 40.0
        return out[:, -1:] if last_only else out

    def step_mixed(self, cache: HostKVCache, decode_ids: np.ndarray, chunk_ids: np.ndarray, last_only: bool = False
                   ) -> tuple[np.ndarray, np.ndarray]:
        """Rows [0, b) decode one token each and row b takes the chunk, in one call (the Backend rules)."""
        assert self.mixed_steps and decode_ids.ndim == 1 and chunk_ids.ndim == 1 and chunk_ids.size
        b = decode_ids.size
        self.mixed_calls.append((b, chunk_ids.size))
        self._mixing = True
        try:
            logits = self.step(cache, decode_ids[:, None].astype(np.int64), 0)[:, 0] if b else np.empty((0, V))
            chunk = self.step(cache, chunk_ids[None].astype(np.int64), b, last_only)[0]
        finally:
            self._mixing = False
        return logits, chunk

    @property
    def tokens_run(self) -> int:
        return sum(b * s for b, s, _ in self.calls)


