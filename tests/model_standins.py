"""Stand-ins for unit tests of the token-level model code (named as what they are).

* :func:`char_tokenizer` — a real :class:`~a4ps.models.tokens.ChatTokenizer` on a tiny
  character-level ``tokenizers`` model (one token per character, ChatML specials), so
  the code under test runs the same tokenizer library as the real model does.
* :class:`StandInEngine` — a TokenEngine whose "model" is a Python function: it scores
  a continuation with ``prefers(prompt_text, continuation_text)`` and streams the text
  ``writes(prompt_text)`` returns. With ``rng`` set it scores and writes at random,
  to check that decisions stay valid whatever a model does.
"""
from __future__ import annotations

import json
import random
import string
from pathlib import Path
from typing import Callable, Iterator, Sequence

from a4ps.models.engine import Sampling
from a4ps.models.tokens import ChatTokenizer

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
            "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def char_tokenizer(folder: Path) -> ChatTokenizer:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    chars = sorted(set(string.printable) | set("éà—…’"))
    vocab = {t: i for i, t in enumerate(SPECIALS + chars + ["[UNK]"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIALS)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "chat_template.jinja").write_text(TEMPLATE)
    (folder / "config.json").write_text(json.dumps({"max_position_embeddings": 4096}))
    return ChatTokenizer(folder)


class StandInEngine:
    name = "stand-in"

    def __init__(self, tok: ChatTokenizer, *,
                 prefers: Callable[[str, str], float] | None = None,
                 writes: Callable[[str], str] | None = None,
                 rng: random.Random | None = None) -> None:
        self.tok = tok
        self.prefers = prefers or (lambda prompt, cont: 0.0)
        self.writes = writes or (lambda prompt: "<|im_end|>")
        self.rng = rng
        self.streamed: list[str] = []         # what each stream wrote
        self.stream_prompts: list[str] = []   # the text each stream continued
        self.closed = 0

    def stream(self, ids: list[int], *, max_new: int, sampling: Sampling) -> Iterator[int]:
        prompt = self.tok.tok.decode(ids, skip_special_tokens=False)
        self.stream_prompts.append(prompt)
        if self.rng is not None:
            alphabet = string.printable + '"""\\\\,}]'
            text = "".join(self.rng.choice(alphabet) for _ in range(self.rng.randint(0, 60)))
        else:
            text = self.writes(prompt)
        self.streamed.append(text)
        out = self.tok.tok.encode(text, add_special_tokens=False).ids
        try:
            for i in out[:max_new]:
                yield i
        finally:
            self.closed += 1

    def score(self, prefix: list[int], continuations: Sequence[list[int]]) -> list[list[float]]:
        prompt = self.tok.tok.decode(prefix, skip_special_tokens=False)
        out = []
        for c in continuations:
            if self.rng is not None:
                out.append([self.rng.uniform(-8, 0) for _ in c])
                continue
            total = self.prefers(prompt, self.tok.decode(c))
            out.append([total / max(1, len(c))] * len(c))
        return out
