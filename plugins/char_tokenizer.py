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

    def _set(self, chars: str) -> None:
        self.chars = chars
        self.vocab_size = len(chars)
        self._ids = {char: i for i, char in enumerate(chars)}

    def train(self, texts: Iterable[str]) -> None:
        seen: set[str] = set()
        for text in texts:
            seen.update(text)
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
