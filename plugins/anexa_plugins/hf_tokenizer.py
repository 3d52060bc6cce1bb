"""Tokenizer plugin ``hf``: a pretrained model's own tokenizer, as Hugging Face ``tokenizers`` defines it.

``anexa import`` stores it with the weights: the ``tokenizer.json`` of a Hugging Face folder (or one
rebuilt from a GGUF file's vocabulary and merges), the special tokens (BOS, EOS, end of turn) and the
model's chat template. It is never trained on a corpus: fine-tuning keeps the model's own vocabulary.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from tokenizers import Tokenizer as HFTokenizer

from anexa_core import AnexaError, hookimpl
from anexa_plugins.hf_backed import HFBacked


class PretrainedTokenizer(HFBacked):
    """A pretrained model's tokenizer. No options: everything comes from the model it was imported with.

    ``encode`` turns special-token text (``<|im_start|>``) into its id, as a rendered chat template needs
    (and as ``transformers``' ``apply_chat_template`` does); ``decode`` keeps special tokens, so
    ``decode(encode(text)) == text``. ``eos_ids`` are the ids that end a reply (EOS and the template's
    end of turn); ``bos_id`` is prepended to a prompt when the model expects it (``add_bos``).
    """

    _missing = "tokenizer 'hf' has no vocabulary: it is loaded with a model (`anexa import`)"

    def __init__(self) -> None:
        super().__init__()
        self.chat_template: str | None = None
        self.special_tokens: dict[str, str | None] = {}
        self.eos_ids: list[int] = []
        self.bos_id: int | None = None
        self.add_bos = False
        self._state: dict[str, Any] = {}

    def train(self, texts: Iterable[str]) -> None:
        raise AnexaError(
            "tokenizer 'hf' comes with a pretrained model and is not trained on a corpus: fine-tune with "
            "`anexa train --init-from MODEL` (which keeps the model's tokenizer), or pick --tokenizer bpe"
        )

    def token_id(self, token: str | None) -> int | None:
        """The id of a whole token (``<|im_end|>``), or ``None``."""
        return None if token is None else self._trained().token_to_id(token)

    def state_dict(self) -> dict[str, Any]:
        return dict(self._state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """``{"type": "hf", "tokenizer": tokenizer.json text, "special_tokens": {"bos_token", "eos_token",
        …}, "eos_tokens": [...], "add_bos": bool, "chat_template": str | None}``."""
        serialized = state.get("tokenizer") if isinstance(state, dict) and state.get("type") == "hf" else None
        try:
            if not isinstance(serialized, str):
                raise ValueError("missing 'tokenizer' JSON")
            tokenizer = HFTokenizer.from_str(serialized)
            special = dict(state.get("special_tokens") or {})
            template = state.get("chat_template")
            if template is not None and not isinstance(template, str):
                raise ValueError("chat_template must be text")
        except Exception as exc:
            detail = " ".join(str(exc).split())[:200]
            raise AnexaError(
                f"saved tokenizer 'hf' is malformed ({detail}): the checkpoint is damaged; import the model again"
            ) from None
        self._set(tokenizer)
        self._state = dict(state)
        self.special_tokens, self.chat_template = special, template
        self.add_bos = bool(state.get("add_bos", False))
        self.bos_id = self.token_id(special.get("bos_token"))
        ends = [special.get("eos_token"), *(state.get("eos_tokens") or [])]
        self.eos_ids = list(dict.fromkeys(i for i in map(self.token_id, ends) if i is not None))


@hookimpl
def register_tokenizers(register):
    register("hf", PretrainedTokenizer)
