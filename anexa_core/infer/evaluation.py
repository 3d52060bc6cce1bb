"""``anexa eval``: a model's loss on a whole text, every token scored once, in strided windows.

The text's token ids ``t[0] … t[N-1]`` come from the token cache (:mod:`anexa_core.data.tokens`, keyed by
the model's own tokenizer), so a text is tokenized once however often it is evaluated. Every token but
the first (which nothing precedes) is predicted exactly once, as in Hugging Face's "Perplexity of
fixed-length models" guide:

- windows are ``L = min(block_size, N - 1)`` tokens long and start every ``stride`` tokens
  (``1 ≤ stride ≤ L``; default ``L // 2``); the last one is moved back to end at the last token, so all
  windows have the same length;
- the first window scores all its ``L`` predictions; each later window scores only the predictions not
  scored before — its last ``stride`` positions (fewer for the final one) — so a scored token sees at
  least ``L - stride`` tokens of context (all ``L`` with ``stride = 1``, nothing extra with
  ``stride = L``);
- ``nats_per_token`` is the mean negative log-likelihood (natural log) over the ``N - 1`` predicted
  tokens, ``perplexity = exp(nats_per_token)``;
- ``bits_per_char`` is the total negative log-likelihood in bits divided by the number of characters
  those tokens spell: the characters of the (normalised) text minus those of the first token. It does
  not depend on the tokenizer, so a char and a BPE model can be compared on it; nats per token cannot.

With ``stride = L`` and ``N - 1`` a multiple of ``L`` the windows are disjoint and ``nats_per_token`` is
the mean of the windows' mean losses (what the tests check by hand).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from anexa_core.config import PRECISIONS
from anexa_core.data import corpus as corpora
from anexa_core.data import tokens
from anexa_core.errors import AnexaError
from anexa_core.infer.engine import score
from anexa_core.model.gpt import GPT

LOGITS_BUDGET = 1 << 25
"""Logits per batch (windows × length × vocabulary) when the batch size is automatic: 128 MiB in float32."""
MAX_AUTO_BATCH = 64
CPU_BATCH_TOKENS = 2048
"""Tokens per batch (windows × length) at most when the batch size is automatic on a CPU: larger batches
were slower there (the `small` preset on Sherlock's validation split, one thread: 8 windows of 256 tokens
10.6 s, 64 windows 12.0 s; benchmarks/RESULTS.md), their activations and attention scores no longer
fitting the caches. A GPU takes up to :data:`MAX_AUTO_BATCH`."""


@dataclass(frozen=True)
class EvalResult:
    """What :func:`evaluate` measured. ``tokens``: predictions scored (N − 1); ``characters``: characters
    they spell; ``nats``: their total negative log-likelihood (natural log); the rest as in the module
    docstring. ``windows``/``window``/``stride`` describe the pass (``window`` = L)."""

    tokens: int
    characters: int
    nats: float
    nats_per_token: float
    bits_per_char: float
    perplexity: float
    windows: int
    window: int
    stride: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def window_plan(n_tokens: int, block_size: int, stride: int | None = None) -> tuple[np.ndarray, np.ndarray, int, int]:
    """``(starts, first_scored, L, stride)`` for strided windows over ``n_tokens`` ids (see the module docstring).

    ``starts`` (W,) int64: where each window's inputs begin; ``first_scored`` (W,) int64: the first of its
    ``L`` positions whose prediction counts. Position ``j`` of window ``w`` predicts token
    ``starts[w] + j + 1``. Raises :class:`AnexaError` for fewer than 2 tokens or a stride outside [1, L].
    """
    if n_tokens < 2:
        raise AnexaError(f"the text has {n_tokens} token(s): it needs at least 2 to score a prediction")
    length = min(block_size, n_tokens - 1)
    stride = max(1, length // 2) if stride is None else stride
    if not 1 <= stride <= length:
        raise AnexaError(
            f"--stride {stride} must be between 1 and the window length {length} (the model's "
            "context, or the text's length if shorter)"
        )
    last = n_tokens - 1 - length
    starts = np.array([*list(range(0, last, stride)), last], dtype=np.int64)
    ends = starts + length  # each window's last predicted token
    first = np.zeros(len(starts), dtype=np.int64)
    first[1:] = ends[:-1] - starts[1:]
    return starts, first, length, stride


def auto_batch_size(length: int, vocab_size: int, device: torch.device | str = "cpu") -> int:
    """Windows per batch keeping the logits within :data:`LOGITS_BUDGET`: at least 1, at most
    :data:`MAX_AUTO_BATCH`, and on a CPU at most :data:`CPU_BATCH_TOKENS` tokens."""
    most = MAX_AUTO_BATCH if torch.device(device).type != "cpu" else max(1, CPU_BATCH_TOKENS // max(1, length))
    return max(1, min(most, LOGITS_BUDGET // max(1, length * vocab_size)))


def evaluate(
    model: GPT,
    ids: np.ndarray,
    characters: int,
    stride: int | None = None,
    batch_size: int | None = None,
    device: torch.device | str = "cpu",
    progress=None,
    precision: str = "fp32",
) -> EvalResult:
    """Score every token of ``ids`` (1-D integer array, e.g. a token-cache memmap) but the first, once.

    ``characters``: the characters the predicted tokens spell (see the module docstring). The model runs
    in eval mode (no dropout) in float32 by default — the same numbers on every machine — or with
    ``precision`` ``auto``/``bf16`` under bf16 autocast as training may (:func:`anexa_core.device.autocast`);
    the log-likelihoods are computed in float32 and summed in float64.
    ``progress(phase, done, total, unit="windows")`` follows the windows. Returns an :class:`EvalResult`.
    """
    if precision not in PRECISIONS:
        raise AnexaError(f"unknown precision {precision!r}: use fp32, auto or bf16")
    device = torch.device(device)
    starts, first, length, stride = window_plan(len(ids), model.config.block_size, stride)
    batch = batch_size or auto_batch_size(length, model.config.vocab_size, device)
    offsets = np.arange(length + 1)
    was_training = model.training
    model.eval()
    total = 0.0
    positions = torch.arange(length, device=device)
    done = 0
    try:
        for begin in range(0, len(starts), batch):
            chunk = slice(begin, begin + batch)
            windows = torch.from_numpy(np.asarray(ids[starts[chunk, None] + offsets], dtype=np.int64)).to(device)
            nll = -score(model, windows, precision)[0]  # (b, L): the engine's scoring pass
            scored = positions[None, :] >= torch.from_numpy(first[chunk]).to(device)[:, None]
            total += float(nll.double().masked_fill(~scored, 0.0).sum())
            done = min(begin + batch, len(starts))
            if progress is not None:
                progress("evaluating", done, len(starts), unit="windows")
    finally:
        model.train(was_training)
        if progress is not None and done < len(starts):  # stopped early: end the phase all the same
            progress("evaluating", done, done, unit="windows")
    count = len(ids) - 1
    if characters < 1:
        raise AnexaError("the scored tokens spell no characters: evaluate a longer text")
    per_token = total / count
    return EvalResult(
        tokens=count,
        characters=characters,
        nats=total,
        nats_per_token=per_token,
        bits_per_char=total / math.log(2) / characters,
        perplexity=math.exp(per_token),
        windows=len(starts),
        window=length,
        stride=stride,
    )


def evaluate_text(
    model: GPT,
    tokenizer: Any,
    meta: dict[str, Any],
    data_specs: str | Sequence[str],
    globs: Sequence[str] = corpora.DEFAULT_GLOBS,
    stride: int | None = None,
    batch_size: int | None = None,
    device: torch.device | str = "cpu",
    progress=None,
    precision: str = "fp32",
) -> tuple[EvalResult, dict[str, Any]]:
    """:func:`evaluate` on the text of ``--data`` (files, folders, datasets, URLs: see
    :func:`anexa_core.data.corpus.resolve_corpus`), tokenized with the model's tokenizer through the token cache.

    ``meta``: the checkpoint metadata from :func:`anexa_core.io.checkpoint.load_model` (its tokenizer's name
    and options key the cache). Returns the result and a description of the data (``files``,
    ``label``, ``tokenized``: whether this call had to tokenize). Raises :class:`AnexaError` when the
    text cannot be read or the tokenizer cannot encode it.
    """
    corpus = corpora.resolve_corpus(data_specs, globs)
    entry = meta["tokenizer"]
    digests = tokens.file_digests(corpus.files, progress)
    try:
        stream = tokens.encoded(corpus, digests, tokenizer, entry["name"], entry.get("options", {}), progress)
    except tokens.TokenizeError as exc:
        raise AnexaError(f"--data {corpus.label} does not fit this model's tokenizer: {exc}") from None
    ids = stream.ids
    first_chars = len(tokenizer.decode([int(ids[0])])) if len(ids) else 0
    result = evaluate(model, ids, stream.characters - first_chars, stride, batch_size, device, progress, precision)
    return result, {
        "label": corpus.label,
        "files": len(corpus.files),
        "tokenized": stream.built,
        "total_tokens": len(ids),
        "total_characters": stream.characters,
    }
