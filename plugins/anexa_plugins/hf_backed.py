"""What the ``bpe`` and ``hf`` tokenizers share: a Hugging Face ``tokenizers.Tokenizer`` behind Anexa's
tokenizer interface (encode, batched encode, decode with the streaming rule, export). Not a plugin."""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import Tokenizer as HFTokenizer

from anexa_core import AnexaError


class HFBacked:
    """A tokenizer whose work a ``tokenizers.Tokenizer`` does. Subclasses set ``_tokenizer`` (through
    :meth:`_set`) and say in ``_missing`` what to do while there is none."""

    _missing = "the tokenizer has no vocabulary yet: train it or load a checkpoint first"

    def __init__(self) -> None:
        self.vocab_size = 0
        self._tokenizer: HFTokenizer | None = None

    def _set(self, tokenizer: HFTokenizer) -> None:
        self._tokenizer = tokenizer
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

    def _trained(self) -> HFTokenizer:
        if self._tokenizer is None:
            raise AnexaError(self._missing)
        return self._tokenizer

    def encode(self, text: str) -> list[int]:
        return self._trained().encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encodes in parallel threads (the ``tokenizers`` library's Rust pool), without character offsets."""
        tokenizer = self._trained()
        batch = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
        return [encoding.ids for encoding in batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        """Special tokens kept; ids that end inside a multi-byte character (a generation cut short) decode
        to U+FFFD. An id outside the vocabulary is a one-line error."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise AnexaError(
                f"token id {bad[0]} is outside this tokenizer's {self.vocab_size} tokens: "
                "the ids come from a model with a different tokenizer"
            )
        return self._trained().decode(ids, skip_special_tokens=False)

    def export_hf(self) -> HFTokenizer:
        """A copy of the ``tokenizers.Tokenizer`` this is."""
        return HFTokenizer.from_str(self._trained().to_str())
