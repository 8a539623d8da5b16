"""Token-level parts every embedded engine shares: the chat tokenizer, the text stream.

Both engines (CTranslate2 and the transformers fallback) see the same token ids, so a
prompt, a stop string and a decision are handled identically whichever runs. The
tokenizer is the ``tokenizers`` library on ``tokenizer.json`` plus the model's Jinja
chat template: no transformers import, so loading the fast engine stays under a second.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence, cast

from a4ps.models.base import Message
from a4ps.models.errors import InvalidRequest, ModelLoadError

# Which token ends a turn: SmolLM2's GGUF names <|im_start|> as EOS; the model really
# ends a reply with <|im_end|>. Any of these stops a generation.
_END_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|im_start|>", "</s>", "<|eot_id|>")


class ChatTokenizer:
    """Chat template + byte-level BPE, from a Hugging Face model directory."""

    def __init__(self, model_dir: Path) -> None:
        from jinja2.sandbox import ImmutableSandboxedEnvironment
        from tokenizers import Tokenizer
        model_dir = Path(model_dir)
        try:
            self.tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
            template = _read_template(model_dir)
        except Exception as e:
            raise ModelLoadError(f"could not read the tokenizer in {model_dir} ({e}); delete "
                                 f"that directory and it will be rebuilt") from e
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        self.template = env.from_string(template)
        vocab = self.tok.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1
        self.end_ids = frozenset(vocab[t] for t in _END_TOKENS if t in vocab)
        self.turn_end = next((vocab[t] for t in _END_TOKENS if t in vocab), None)
        self.special_ids = frozenset(
            i for t, i in vocab.items() if t.startswith("<|") and t.endswith("|>"))
        self.max_positions = _max_positions(model_dir)
        self._concatenates: bool | None = None

    # -- text <-> ids -------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Plain text to ids (no special tokens added)."""
        return list(self.tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    @property
    def concatenates_decodes(self) -> bool:
        """Whether ``decode(a + b) == decode(a) + decode(b)`` when ``a`` ends on a whole
        character: true of byte-level BPE decoders (SmolLM2, GPT-2 style: bytes joined,
        then UTF-8), not of ones that strip or rewrite across pieces (Metaspace, Strip,
        CTC, WordPiece, a Replace of a longer pattern, ...)."""
        if self._concatenates is None:
            state = self.tok.decoder.__getstate__() if self.tok.decoder is not None else None
            dec = json.loads(state) if state else {}         # just the decoder's JSON
            parts = dec.get("decoders", []) if dec.get("type") == "Sequence" else [dec]
            self._concatenates = bool(parts) and all(
                p.get("type") in ("ByteLevel", "ByteFallback", "Fuse") or
                (p.get("type") == "Replace" and len(str((p.get("pattern") or {}).get(
                    "String", ""))) == 1)
                for p in parts)
        return self._concatenates

    def token_strings(self, ids: Sequence[int]) -> list[str]:
        """The vocabulary entries of ``ids`` (what CTranslate2 takes as input)."""
        strings = [self.tok.id_to_token(int(i)) for i in ids]
        if None in strings:      # an id from another vocabulary: say so, not fail in C++
            bad = [int(i) for i, t in zip(ids, strings) if t is None]
            raise InvalidRequest(f"token ids {bad[:5]} are not in this model's vocabulary")
        return cast(list[str], strings)       # no None: checked above

    def render(self, messages: list[Message], add_generation_prompt: bool = True) -> str:
        return self.template.render(messages=messages,
                                    add_generation_prompt=add_generation_prompt)

    def chat_ids(self, messages: list[Message], reserve: int = 0) -> list[int]:
        """The prompt ids for ``messages``; oldest turns dropped if the context would
        overflow with ``reserve`` tokens left for the answer."""
        limit = max(16, self.max_positions - reserve)
        msgs = list(messages)
        while True:
            ids = self.encode(self.render(msgs))
            if len(ids) <= limit:
                return ids
            first = 1 if msgs and msgs[0]["role"] == "system" else 0
            if len(msgs) - first <= 1:       # one huge message: keep its tail
                return ids[-limit:]
            del msgs[first]


def _read_template(model_dir: Path) -> str:
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    template = cfg.get("chat_template")
    if not isinstance(template, str):
        raise ValueError("no chat template (chat_template.jinja or tokenizer_config.json)")
    return template


def _max_positions(model_dir: Path) -> int:
    try:
        cfg = json.loads((model_dir / "config.json").read_text())
        return int(cfg.get("max_position_embeddings") or 8192)
    except (OSError, ValueError):
        return 8192


# --------------------------------------------------------------------------- streams

class TextStream:
    """Token ids in, text deltas out: stop strings cut inside the loop, partial
    multi-byte characters and possible stop-string prefixes held back until known."""

    def __init__(self, tok: ChatTokenizer, stop: Sequence[str],
                 on_token: Callable[[str], None] | None) -> None:
        self.tok = tok
        self.stop = [s for s in stop if s]
        self.on_token = on_token
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0
        self.stopped = False
        # Decoding every id again per token costs O(n) a token (0.3-0.4 ms at 256
        # tokens here); with a byte-level decoder, text up to a token boundary that
        # ends on a whole character never changes, so only the ids after it are decoded.
        self._incremental = tok.concatenates_decodes
        self._settled_ids = 0
        self._settled_text = ""

    def push(self, token_id: int) -> None:
        if self.stopped:
            return
        self.ids.append(int(token_id))
        if self._incremental:
            tail = self.tok.decode(self.ids[self._settled_ids:])
            self.text = self._settled_text + tail
            if len(self.ids) - self._settled_ids >= 8 and not tail.endswith("\ufffd"):
                self._settled_ids, self._settled_text = len(self.ids), self.text
        else:
            self.text = self.tok.decode(self.ids)
        for s in self.stop:
            i = self.text.find(s)
            if i >= 0:
                self.text = self.text[:i]
                self.stopped = True
        self._flush(final=self.stopped)

    def cut(self, n_tokens: int) -> None:
        """Keep only the first ``n_tokens`` ids (a repetition dropped at the end)."""
        self.ids = self.ids[:n_tokens]
        self.text = self.tok.decode(self.ids)
        self._settled_ids, self._settled_text = 0, ""
        self.emitted = min(self.emitted, len(self.text))

    def end(self) -> None:
        self._flush(final=True)

    def _flush(self, final: bool) -> None:
        upto = len(self.text)
        if not final:
            if self.text.endswith("\ufffd"):     # an incomplete multi-byte character
                upto -= 1
            for s in self.stop:                   # hold back a partial stop string
                for k in range(min(len(s) - 1, upto), 0, -1):
                    if self.text[:upto].endswith(s[:k]):
                        upto -= k
                        break
        if upto > self.emitted:
            delta = self.text[self.emitted:upto]
            self.emitted = upto
            if self.on_token is not None:
                self.on_token(delta)


class RepetitionGuard:
    """Stops a generation that has fallen into a loop, while it is generating.

    A loop is the tail of the token ids made of one block repeated back to back:
    at least twice for a block of ``min_block`` tokens or more (a sentence said again),
    and for shorter blocks enough times to cover ``min_span`` tokens ("ha ha ha ...").
    """

    def __init__(self, min_span: int = 24, max_block: int = 96, min_block: int = 12) -> None:
        self.min_span = min_span
        self.max_block = max_block
        self.min_block = min_block
        self.ids: list[int] = []

    def push(self, token_id: int) -> int | None:
        """Add one id; returns how many ids to keep (one copy of the block) on a loop."""
        ids = self.ids
        ids.append(int(token_id))
        n = len(ids)
        last = ids[-1]
        for p in range(1, min(self.max_block, n // 2) + 1):
            if ids[-1 - p] != last:
                continue
            reps = 2 if p >= self.min_block else -(-self.min_span // p)
            span = p * reps
            if span > n:
                continue
            tail = ids[n - span:]
            block = tail[:p]
            if all(tail[i] == block[i % p] for i in range(p, span)):
                return n - span + p
        return None
