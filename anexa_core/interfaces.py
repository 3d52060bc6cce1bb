"""The interfaces plugin objects satisfy. Structural (``typing.Protocol``): there is no base class.

What a plugin registers is a *factory* (usually a dataclass whose fields are the options); what the
factory returns must satisfy the protocol of its kind below. ``docs/plugins.md`` walks through each.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch
    from torch import nn

    from anexa_core.config import ModelConfig, TrainConfig
    from anexa_core.model.gpt import GPT


@runtime_checkable
class Tokenizer(Protocol):
    """Text ↔ token ids. Created with its options, then ``train``-ed on a corpus or loaded from a checkpoint.

    - ``vocab_size``: the number of ids, valid once trained or loaded.
    - ``train(texts)``: learn the vocabulary from an iterable of text chunks (a corpus may be larger
      than memory; chunks end at line boundaries).
    - ``encode(text)`` → ids; raise :class:`~anexa_core.AnexaError` for text it cannot encode.
    - ``decode(ids)`` → text. **Streaming rule**: ids that end inside a multi-byte character decode to
      text ending in U+FFFD, and decoding a slice of ids that starts at a character boundary gives the
      matching part of the whole text — the streamer decodes only a short tail of the output.
    - ``state_dict()`` → the learned vocabulary as JSON-able data; ``load_state_dict(state)`` restores
      it (raise ``AnexaError`` if malformed). Stored in ``model.safetensors`` with the options.
    - Optional ``encode_batch(texts)`` → one id sequence per text (lists, or 1-D integer numpy arrays),
      used when present: tokenizing a corpus calls it on batches of chunks (about 2M characters).
    - Optional ``export_hf()`` → a ``tokenizers.Tokenizer`` giving the same ids and text, which
      ``anexa export --format hf`` saves as ``tokenizer.json``; without it that export is refused.
    - Optional ``token_bytes(id)`` → the UTF-8 bytes one token contributes to the text, which for a
      byte-level token may be part of a character (where ``decode([id])`` shows U+FFFD). The server's
      log-probabilities report them (OpenAI's ``bytes``); without it, ``decode([id])`` encoded.
    - Optional ``special_ids`` → the ids of special tokens (BOS, EOS, chat markers such as
      ``<|im_start|>``): structure, not text. Generated text never shows them (``decode`` still does), and
      a chat reply through the model's own template ends at any of them.
    - Optional, for a pretrained model's tokenizer (the ``hf`` plugin): ``eos_ids`` (the ids that end a
      reply: EOS and the chat template's end of turn; decoding stops there and never shows them),
      ``bos_id`` and ``add_bos`` (prepend BOS to a prompt), ``special_tokens`` (``{"bos_token": …,
      "eos_token": …}``, what a chat template may refer to) and ``chat_template`` (Jinja text rendered by
      :mod:`anexa_core.infer.chat`).
    """

    vocab_size: int

    def train(self, texts: Iterable[str]) -> None: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@runtime_checkable
class Attention(Protocol):
    """``(q, k, v, *, causal, lengths=None) -> out`` on ``(batch, heads, time, head_dim)`` tensors of one dtype.

    ``q`` may be shorter than ``k``/``v`` (decoding with a KV cache): queries are then the last
    positions, and the causal mask is aligned to the bottom right (query i sees keys ≤ i + Tk − Tq).
    Two capabilities an attention declares with class attributes, and the model uses only then (for
    any other it repeats the heads, or runs the rows one at a time — correct, slower):

    - ``grouped_query = True``: ``k``/``v`` may have fewer heads than ``q`` (B, Hkv, Tk, D), ``H`` a
      multiple of ``Hkv``; query head ``h`` reads key/value head ``h // (H / Hkv)`` (GQA, Ainslie et al.
      2023; multi-query when ``Hkv`` = 1).
    - ``ragged = True``: ``lengths`` (B,) int64 may be given: row ``b`` has ``lengths[b]`` ≥ Tq valid keys
      and the rest is padding; its Tq queries are its last valid positions (query i sees keys
      j < lengths[b], and j ≤ lengths[b] − Tq + i when causal). The batched engine decodes requests of
      different lengths this way.

    An attention that deliberately computes something other than exact softmax attention (a sliding
    window, say) declares it with a ``reference(q, k, v, *, causal)`` method computing the same thing
    plainly; the conformance kit and ``anexa bench`` check it against that instead of ``math``.
    One that may compute with another backend exposes ``fallback_reason(q) -> str | None`` and
    ``fallback_backend: str`` so benchmarks label it honestly.
    """

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool) -> torch.Tensor: ...


@runtime_checkable
class Sampler(Protocol):
    """A logits processor, one link in the sampling chain: ``(logits, context) -> logits``.

    ``logits`` (batch, vocab) float, ``context`` (batch, time) token ids. Return logits with removed
    tokens at ``-inf``, at least one finite per row, never NaN or ``+inf``; rows are independent. ``order``
    places it in the chain (lower runs first; ties run in name order). A processor that never reads
    ``context`` may say so with the class attribute ``reads_context = False``: the engine then processes
    the rows of requests with equal chains at once, with an empty context (their histories differ in
    length); otherwise only rows whose histories are as long as each other's.
    """

    order: ClassVar[int]

    def __call__(self, logits: torch.Tensor, context: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class Blocks(Protocol):
    """A model family: ``build(config, attention)`` returns the block stack, an ``nn.Module`` whose

    ``forward(x, positions, cache)`` maps token embeddings ``x`` (B, T, n_embd) to final-normalised
    hidden states (B, T, n_embd). ``positions`` (T,) int64 are the absolute positions of the T tokens
    (0-based; the core numbers them). ``cache`` is ``None`` or a :class:`~anexa_core.KVCache`: each
    attention layer ``i`` calls ``k, v = cache.update(i, k, v)`` once per forward with its new keys and
    values (B, Hkv, T, D) and attends over what it returns, passing ``lengths=cache.lengths(i)`` to the
    attention (``None`` unless rows are ragged). Keys and values may keep fewer heads than the queries
    (grouped-query): the attention the stack is given serves them to the query heads. The stack owns
    positions (learned or rotary), norms and the final norm; the core owns the token embedding, the head
    and the cache's lifetime.

    A stack that sets the class attribute ``batched = True`` takes ``positions`` (B, T) too — rows at
    different positions, with a ragged cache — which lets the batched engine decode several requests in
    one forward; the engine decodes the models of other stacks one request at a time.

    Optional ``export_hf(config, state_dict) -> (hf_config, hf_state_dict)`` maps the family onto a
    Hugging Face transformers architecture for ``anexa export --format hf``. ``state_dict`` holds the
    whole model's CPU tensors under Anexa's names (``wte.weight``, ``blocks.…``, and ``lm_head.weight``
    only when the head is untied); return the ``config.json`` entries (at least ``architectures`` and
    ``model_type``; the core adds ``vocab_size``, ``tie_word_embeddings``, no special tokens and
    ``dtype``) and every tensor under transformers' names, the embedding included. Raise
    :class:`~anexa_core.AnexaError` ("… cannot be exported to Hugging Face: why") for options the target
    cannot express. Without the method, export is refused with a one-line error.

    Its inverse, for ``anexa import``: the factory's ``hf_architectures`` (class attribute, e.g.
    ``("LlamaForCausalLM",)``) names the transformers architectures it reads, and its static method
    ``import_hf(hf_config, tensors) -> (settings, options, state_dict)`` maps a checkpoint of one of them
    (``config.json`` entries, tensors under transformers' names) to :class:`~anexa_core.ModelConfig`
    settings (``n_layer``, ``n_head``, ``n_embd``, ``block_size``, ``vocab_size``, ``tie_embeddings``),
    the family's options, and every tensor under Anexa's names; it raises ``AnexaError`` for what the
    family cannot compute.
    """

    def build(self, config: ModelConfig, attention: Attention) -> nn.Module: ...


@runtime_checkable
class Dataset(Protocol):
    """A named corpus: ``files()`` returns its local UTF-8 text files (``.txt``, or ``.xz``/``.gz``
    compressed), downloading or checking them as needed — one or many, each one document, read in
    order. :class:`~anexa_core.RemoteText` and :class:`~anexa_core.LocalText` do this for one
    checksummed file, :class:`~anexa_core.Collection` for several."""

    description: str

    def files(self) -> list[Path]: ...


@runtime_checkable
class Optimizer(Protocol):
    """``build(model, config)`` returns a ``torch.optim.Optimizer`` over ``model``'s parameters, or a list
    of them when parameter families need different optimizers (Muon for matrices, AdamW for the rest);
    every trainable parameter belongs to exactly one.

    Each param group's ``lr`` is its peak learning rate; the core scales every group by the schedule's
    factor each step (warmup, then cosine decay to ``min_lr / lr``). ``model.parameter_groups()``
    sorts the parameters into embeddings, head, matrices and vectors.
    """

    def build(self, model: GPT, config: TrainConfig) -> torch.optim.Optimizer | list[torch.optim.Optimizer]: ...


OPTIONAL_MEMBERS: dict[str, tuple[str, ...]] = {
    "Tokenizer": (
        "encode_batch",
        "export_hf",
        "token_bytes",
        "special_ids",
        "eos_ids",
        "bos_id",
        "add_bos",
        "special_tokens",
        "chat_template",
    ),
    "Attention": ("reference", "fallback_reason", "fallback_backend", "grouped_query", "ragged", "lengths="),
    "Sampler": ("reads_context",),
    "Blocks": ("export_hf", "hf_architectures", "import_hf", "stack.batched", "positions (B, T)", "cache.lengths"),
    "Dataset": (),
    "Optimizer": (),
}
"""What each kind of plugin may offer beyond its protocol, as the docstrings above describe: part of the
public contract (a change to it changes the version)."""
