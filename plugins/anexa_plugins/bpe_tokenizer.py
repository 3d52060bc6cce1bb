"""Tokenizer plugin ``bpe``: byte-level BPE trained on the corpus with Hugging Face ``tokenizers``.

Every text is first turned into UTF-8 bytes and the 256 byte symbols are always in the vocabulary,
so any string encodes (emoji, other scripts, control characters) and decoding the ids gives back
exactly the original text. Merges learned from the corpus make common words single tokens.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from anexa_core import AnexaError, hookimpl
from anexa_plugins.hf_backed import HFBacked

logger = logging.getLogger("anexa")

DEFAULT_VOCAB_SIZE = 1024
BYTE_ALPHABET_SIZE = 256
MIN_VOCAB_SIZE = BYTE_ALPHABET_SIZE + 1  # the byte alphabet plus at least one merge
MAX_VOCAB_SIZE = 2**20
DEFAULT_MAX_TRAIN_CHARS = 100_000_000


class BPETokenizer(HFBacked):
    """Byte-level BPE (GPT-2's scheme, Radford et al. 2019): 256 byte tokens + learned merges.

    Option ``vocab_size`` is an upper bound: a small corpus with fewer distinct merges yields a smaller
    vocabulary, and after training the ``vocab_size`` attribute reports the real one. Training is
    deterministic (same text and size, same merges), so a rerun rebuilds the same tokenizer.

    Option ``max_train_chars`` caps the text the merges are learned from: training reads the corpus's
    chunks in order and stops after the chunk that reaches it (the first ~100M characters by default;
    a larger corpus is still encoded whole). Merge statistics settle long before that for vocabularies
    of this size, and the cap bounds training time and the memory of its word counts.
    """

    _missing = "the BPE tokenizer is not trained: train it on a corpus or load a checkpoint first"

    def __init__(self, vocab_size: int = DEFAULT_VOCAB_SIZE, max_train_chars: int = DEFAULT_MAX_TRAIN_CHARS) -> None:
        if (
            isinstance(vocab_size, bool)
            or not isinstance(vocab_size, int)
            or not (MIN_VOCAB_SIZE <= vocab_size <= MAX_VOCAB_SIZE)
        ):
            raise AnexaError(
                f"--vocab-size {vocab_size} does not fit byte-level BPE: use {MIN_VOCAB_SIZE} to {MAX_VOCAB_SIZE} "
                f"({BYTE_ALPHABET_SIZE} byte tokens plus merges), e.g. {DEFAULT_VOCAB_SIZE}"
            )
        if isinstance(max_train_chars, bool) or not isinstance(max_train_chars, int) or max_train_chars < 1:
            raise AnexaError(
                f"tokenizer bpe option max_train_chars must be a positive integer, got {max_train_chars!r}"
            )
        super().__init__()
        self.target_size = vocab_size
        self.max_train_chars = max_train_chars

    def train(self, texts: Iterable[str]) -> None:
        tokenizer = HFTokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=self.target_size,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            special_tokens=[],
            show_progress=False,
        )
        seen = False

        def chunks():
            nonlocal seen
            taken = 0
            for text in texts:
                seen = seen or bool(text)
                yield text
                taken += len(text)
                if taken >= self.max_train_chars:
                    return

        tokenizer.train_from_iterator(chunks(), trainer)
        if not seen:
            raise AnexaError("cannot train a BPE tokenizer on empty text: pass a corpus with some content")
        self._set(tokenizer)
        if self.vocab_size < self.target_size:  # said, not dropped silently
            logger.warning(
                "--vocab-size %d: the vocabulary has %d tokens, all the text offers (256 bytes and every merge "
                "it repeats)",
                self.target_size,
                self.vocab_size,
            )

    def state_dict(self) -> dict[str, Any]:
        return {"type": "bpe", "tokenizer": self._trained().to_str()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        serialized = state.get("tokenizer") if isinstance(state, dict) and state.get("type") == "bpe" else None
        try:
            if not isinstance(serialized, str):
                raise ValueError("missing 'tokenizer' JSON")
            self._set(HFTokenizer.from_str(serialized))
        except Exception as exc:
            detail = " ".join(str(exc).split())[:200]
            raise AnexaError(
                f"saved BPE tokenizer is malformed ({detail}): the checkpoint is damaged; "
                "retrain or use another checkpoint"
            ) from None


@hookimpl
def register_tokenizers(register):
    register("bpe", BPETokenizer)
