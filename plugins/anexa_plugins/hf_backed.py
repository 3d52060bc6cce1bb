"""What the ``bpe`` and ``hf`` tokenizers share: a Hugging Face ``tokenizers.Tokenizer`` behind Anexa's
tokenizer interface (encode, batched encode, decode with the streaming rule, export). Not a plugin."""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders

from anexa_core import AnexaError

_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's byte tokens (Llama 2, Mistral)


@functools.cache
def byte_level_alphabet() -> dict[str, int]:
    """The byte each symbol of GPT-2's byte-level alphabet stands for (Radford et al. 2019, the alphabet of
    ``tokenizers``' ``ByteLevel``): the 188 bytes that are printable Latin-1 characters stand for
    themselves; the other 68, in byte order, are written with the code points from U+0100 upward."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    alphabet = {chr(byte): byte for byte in printable}
    hidden = [byte for byte in range(256) if byte not in alphabet.values()]
    alphabet.update({chr(0x100 + n): byte for n, byte in enumerate(hidden)})
    return alphabet


class HFBacked:
    """A tokenizer whose work a ``tokenizers.Tokenizer`` does. Subclasses set ``_tokenizer`` (through
    :meth:`_set`) and say in ``_missing`` what to do while there is none. ``special_ids``: its added tokens
    marked special (BOS, EOS, chat markers), which generated text never shows."""

    _missing = "the tokenizer has no vocabulary yet: train it or load a checkpoint first"

    def __init__(self) -> None:
        self.vocab_size = 0
        self.special_ids: frozenset[int] = frozenset()
        self._tokenizer: HFTokenizer | None = None

    def _set(self, tokenizer: HFTokenizer) -> None:
        self._tokenizer = tokenizer
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        added = tokenizer.get_added_tokens_decoder()
        self.special_ids = frozenset(token_id for token_id, token in added.items() if token.special)

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

    def token_bytes(self, token_id: int) -> bytes:
        """The UTF-8 bytes token ``token_id`` adds to the text — part of a character for a byte-level token
        that splits one, where ``decode([token_id])`` shows U+FFFD: its symbols read through the byte-level
        alphabet, or its ``<0xNN>`` byte; a special (added) token's own text; any other's decode. An id
        outside the vocabulary is a one-line error."""
        text = self.decode([token_id])  # also checks the id
        tokenizer = self._trained()
        added = tokenizer.get_added_tokens_decoder().get(token_id)
        if added is not None:  # its text as written (a byte-level decoder would misread "é" in it)
            return added.content.encode("utf-8")
        piece = tokenizer.id_to_token(token_id)
        if piece is None:
            return text.encode("utf-8")
        byte = _BYTE_FALLBACK.fullmatch(piece)
        if byte is not None:
            return bytes([int(byte[1], 16)])
        alphabet = byte_level_alphabet()
        if isinstance(tokenizer.decoder, decoders.ByteLevel) and all(symbol in alphabet for symbol in piece):
            return bytes(alphabet[symbol] for symbol in piece)
        return text.encode("utf-8")

    def export_hf(self) -> HFTokenizer:
        """A copy of the ``tokenizers.Tokenizer`` this is."""
        return HFTokenizer.from_str(self._trained().to_str())
