"""Byte-level BPE tokenizer, trained on the corpus with Hugging Face ``tokenizers``.

Every text is first turned into UTF-8 bytes and the 256 byte symbols are always in the vocabulary,
so any string encodes (emoji, other scripts, control characters) and decoding the ids gives back
exactly the original text. Merges learned from the corpus make common words single tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from anexa_core import AnexaError, hookimpl

DEFAULT_VOCAB_SIZE = 1024
BYTE_ALPHABET_SIZE = 256
MIN_VOCAB_SIZE = BYTE_ALPHABET_SIZE + 1  # the byte alphabet plus at least one merge


class BPETokenizer:
    """Byte-level BPE: ``vocab_size`` = 256 byte tokens + learned merges.

    ``vocab_size`` is an upper bound: a small corpus with fewer distinct merges yields a smaller
    vocabulary, and the ``vocab_size`` attribute reports the real one. Training is deterministic
    (same text and size, same merges), so a rerun rebuilds the same tokenizer.
    """

    def __init__(self, tokenizer: HFTokenizer) -> None:
        self._tokenizer = tokenizer
        self.vocab_size = tokenizer.get_vocab_size()

    @classmethod
    def train(cls, text: str, vocab_size: int | None = None) -> BPETokenizer:
        size = DEFAULT_VOCAB_SIZE if vocab_size is None else vocab_size
        if isinstance(size, bool) or not isinstance(size, int) or size < MIN_VOCAB_SIZE:
            raise AnexaError(
                f"--vocab-size {size} is too small for byte-level BPE: use at least {MIN_VOCAB_SIZE} "
                f"({BYTE_ALPHABET_SIZE} byte tokens plus merges), e.g. {DEFAULT_VOCAB_SIZE}"
            )
        if not text:
            raise AnexaError("cannot train a BPE tokenizer on empty text: pass a corpus with some content")
        tokenizer = HFTokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=size,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            special_tokens=[],
            show_progress=False,
        )
        # The whole text in one piece, so whitespace runs such as blank lines pre-tokenize as in encode.
        tokenizer.train_from_iterator([text], trainer)
        return cls(tokenizer)

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise AnexaError(
                f"token id {bad[0]} is outside this tokenizer's {self.vocab_size} tokens: "
                "the ids come from a model trained with a different tokenizer"
            )
        # Ids that end inside a multi-byte character (a generation cut short) decode to U+FFFD.
        return self._tokenizer.decode(ids, skip_special_tokens=False)

    def to_dict(self) -> dict[str, Any]:
        return {"type": "bpe", "tokenizer": self._tokenizer.to_str()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BPETokenizer:
        serialized = data.get("tokenizer") if isinstance(data, dict) and data.get("type") == "bpe" else None
        try:
            if not isinstance(serialized, str):
                raise ValueError("missing 'tokenizer' JSON")
            return cls(HFTokenizer.from_str(serialized))
        except Exception as exc:
            detail = " ".join(str(exc).split())[:200]
            raise AnexaError(
                f"saved BPE tokenizer is malformed ({detail}): the checkpoint is damaged; "
                "retrain or use another checkpoint"
            ) from None


@hookimpl
def register_tokenizers(register):
    register("bpe", BPETokenizer)
