"""Tokenizer plugin ``char``: one token per distinct character of the training text."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from anexa_core import AnexaError, hookimpl

_SHOWN_UNSEEN = 5


class CharTokenizer:
    """Vocabulary = the sorted distinct characters of the training text; id = position in it. No options.

    Characters never seen in training have no id: ``encode`` raises an :class:`AnexaError` naming them
    instead of dropping or replacing them, because a silently altered prompt would make the model's
    answer look like a model bug. Use the ``bpe`` tokenizer when prompts may contain arbitrary text.
    """

    def __init__(self) -> None:
        self.chars = ""
        self.vocab_size = 0
        self._ids: dict[str, int] = {}
        self._table: Any = None  # code point → id (-1: unseen), a numpy array built on first encode_batch

    def _set(self, chars: str) -> None:
        self.chars = chars
        self.vocab_size = len(chars)
        self._ids = {char: i for i, char in enumerate(chars)}
        self._table = None

    def train(self, texts: Iterable[str]) -> None:
        """Collect the distinct characters of ``texts`` (chunks of any size; ASCII chunks take a fast path)."""
        seen: set[str] = set()
        known_ascii = b""
        for text in texts:
            # Delete the ASCII characters already seen from the UTF-8 bytes (at memory speed); what is left
            # is still UTF-8 and usually short, so the set of what remains is cheap.
            rest = text.encode("utf-8", "surrogatepass").translate(None, known_ascii)
            if rest:
                new = set(rest.decode("utf-8", "surrogatepass"))
                seen |= new
                known_ascii += bytes(sorted(ord(char) for char in new if ord(char) < 128))
        if not seen:
            raise AnexaError("cannot train a char tokenizer on empty text: pass a corpus with some content")
        self._set("".join(sorted(seen)))

    def encode(self, text: str) -> list[int]:
        try:
            return [self._ids[char] for char in text]
        except KeyError:
            pass
        unseen = sorted({char for char in text if char not in self._ids})
        shown = ", ".join(repr(char) for char in unseen[:_SHOWN_UNSEEN])
        more = f" and {len(unseen) - _SHOWN_UNSEEN} more" if len(unseen) > _SHOWN_UNSEEN else ""
        raise AnexaError(
            f"the text contains characters never seen in training ({shown}{more}): the model only knows "
            "the characters of its training text; remove them, or train with --tokenizer bpe"
        )

    def encode_batch(self, texts: Sequence[str]) -> list:
        """``encode`` of each text, vectorised: 1-D int32 numpy arrays of ids (same ids, same errors)."""
        import numpy as np

        if self._table is None:
            points = [ord(char) for char in self.chars]
            table = np.full(max(points, default=0) + 1, -1, dtype=np.int32)
            table[points] = np.arange(len(points), dtype=np.int32)
            self._table = table
        out = []
        for text in texts:
            try:
                codes: Any
                if text.isascii():
                    codes = np.frombuffer(text.encode("ascii"), dtype=np.uint8)
                else:
                    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
            except UnicodeEncodeError:  # lone surrogates: the plain path says what is wrong
                out.append(self.encode(text))
                continue
            if codes.size and int(codes.max()) >= len(self._table):
                self.encode(text)  # raises, naming the unseen characters
            ids = self._table[codes]
            if ids.size and int(ids.min()) < 0:
                self.encode(text)
            out.append(ids)
        return out

    def decode(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise AnexaError(
                f"token id {bad[0]} is outside this tokenizer's {self.vocab_size} characters: "
                "the ids come from a model trained with a different tokenizer"
            )
        return "".join(self.chars[i] for i in ids)

    def state_dict(self) -> dict[str, Any]:
        return {"type": "char", "chars": self.chars}

    def export_hf(self):
        """This vocabulary as a Hugging Face ``tokenizers.Tokenizer`` with the same ids: a word-level model
        whose words are the characters, a pre-tokenizer that isolates every character (``[\\s\\S]``
        matches any one, newlines included) and a decoder that joins tokens without spaces. As here, a
        character outside the vocabulary cannot be encoded (there is no unknown token)."""
        from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

        if not self.vocab_size:
            raise AnexaError("the char tokenizer is not trained: train it or load a checkpoint first")
        tokenizer = Tokenizer(models.WordLevel({char: i for i, char in enumerate(self.chars)}, unk_token=None))
        tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), "isolated")
        tokenizer.decoder = decoders.Fuse()
        return tokenizer

    def load_state_dict(self, state: dict[str, Any]) -> None:
        chars = state.get("chars") if isinstance(state, dict) and state.get("type") == "char" else None
        if not isinstance(chars, str) or not chars or list(chars) != sorted(set(chars)):
            raise AnexaError(
                "saved char tokenizer is malformed (expected type 'char' and a sorted string of distinct "
                "characters): the checkpoint is damaged; retrain or use another checkpoint"
            )
        self._set(chars)


@hookimpl
def register_tokenizers(register):
    register("char", CharTokenizer)
