"""GGUF files to and from Hugging Face transformers' representation of a model, through the ``gguf`` package.

Anexa imports a pretrained model as transformers describes it: a ``config.json`` dict and float tensors under
transformers' parameter names. :func:`read_gguf` turns a GGUF file (llama.cpp's format) into that, plus the
state of Anexa's ``hf`` tokenizer plugin; :func:`write_gguf` is the inverse. Three architectures, the ones
Anexa's blocks speak: ``llama`` (``LlamaForCausalLM``), ``qwen3`` (``Qwen3ForCausalLM``) and ``gpt2``
(``GPT2LMHeadModel``); one tokenizer model, ``gpt2`` (byte-level BPE).

Sources of the facts used here (read for facts, no code taken):

* llama.cpp ``convert_hf_to_gguf.py``: ``LlamaModel.permute`` reorders the rows of the Q and K projections
  (weights and biases) of Llama models from transformers' "rotate half" rotary layout to llama.cpp's
  interleaved one, per head; Qwen3 models are written unpermuted (llama.cpp runs them with NEOX rope);
  GPT-2's ``Conv1D`` weights (``c_attn``, ``c_proj``, ``c_fc``) are transposed to ``(out, in)``, and its
  ``attn.bias``/``attn.masked_bias`` buffers dropped; the output projection is written only when it is not
  the token embedding. Tensor and metadata key names are gguf-py's ``constants.py`` / ``tensor_mapping.py``.
* llama.cpp ``src/llama-vocab.cpp``: the pre-tokenizer split for each ``tokenizer.ggml.pre`` name, which of
  them ignore merges and add BOS by default, and the texts of end-of-generation tokens (``<|im_end|>``, …).
* The GGUF spec (ggml ``docs/gguf.md``): ``tokenizer.ggml.token_type`` values (1 normal, 2 unknown,
  3 control, 4 user-defined, 5 unused, 6 byte); control and user-defined tokens are stored as plain text,
  every other token of a byte-level vocabulary in GPT-2's byte-to-unicode spelling.
"""

from __future__ import annotations

import itertools
import json
import os
import re
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import numpy as np
import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from anexa_core.errors import AnexaError, choose_one_of, one_line
from anexa_core.io.files import atomic_path

if TYPE_CHECKING:
    import numpy.typing as npt
    from gguf import GGUFReader

__all__ = ["SUPPORTED_ARCHITECTURES", "WRITE_DTYPES", "GGUFModel", "read_gguf", "write_gguf"]

SUPPORTED_ARCHITECTURES = ("gpt2", "llama", "qwen3")
"""``general.architecture`` values this module reads and writes."""

WRITE_DTYPES = ("f32", "f16", "q8_0")
"""``dtype`` values of :func:`write_gguf`."""

_HF_CLASSES = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM", "gpt2": "GPT2LMHeadModel"}
_ARCH_OF_CLASS = {cls: arch for arch, cls in _HF_CLASSES.items()}
_FIX_FILE = "download the file again or convert the model to GGUF again"
# Token types of `tokenizer.ggml.token_type` (gguf-py's TokenType).
_NORMAL, _CONTROL, _USER_DEFINED, _UNUSED = 1, 3, 4, 5
# End-of-turn token texts llama.cpp's vocabulary loader recognises as end of generation.
_END_OF_TURN_TEXTS = (
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<EOT>",
    "_<EOT>",
    "<｜end▁of▁sentence｜>",
    "<end_of_utterance>",
    "<|return|>",
    "<|call|>",
)


@dataclass
class GGUFModel:
    """A model read from a GGUF file, in transformers' representation.

    ``hf_config``: the ``config.json`` entries transformers would use (``architectures``, ``model_type``,
    sizes, ``rope_theta`` and ``rope_parameters``, ``tie_word_embeddings``, token ids; GPT-2's ``n_embd``, …).
    ``tensors``: contiguous float32 CPU tensors under transformers' names (``model.embed_tokens.weight``, …;
    ``lm_head.weight`` only when the embedding is not tied; GPT-2's ``Conv1D`` weights ``(in, out)``).
    ``tokenizer``: the state dict of Anexa's ``hf`` tokenizer plugin. ``metadata``: the file's small metadata
    entries under their GGUF keys (``general.name``, ``general.license``, …) plus ``file_type`` (the
    llama.cpp file type's name), ``tensor_types`` (tensor type name → count), ``context_length`` and
    ``parameters``.
    """

    hf_config: dict[str, Any]
    tensors: dict[str, torch.Tensor] = field(repr=False)
    tokenizer: dict[str, Any] = field(repr=False)
    metadata: dict[str, Any]


# ---------------------------------------------------------------------------------------------------------
# The tensors of each architecture, under both names.


class _Slot(NamedTuple):
    """One tensor: transformers' name, llama.cpp's name, transformers' shape, and what llama.cpp does to it
    (``""``; ``"q"``/``"k"``: the rotary row permutation of the Q/K projection; ``"t"``: transposed)."""

    hf: str
    gguf: str
    shape: tuple[int, ...]
    op: Literal["", "q", "k", "t"] = ""


def _decoder_slots(arch: str, cfg: Mapping[str, Any]) -> list[_Slot]:
    """The tensors of a Llama or Qwen3 model with this config (transformers' config keys)."""
    hidden, inter, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    heads, kv_heads, head_dim = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    attn_bias, mlp_bias = bool(cfg.get("attention_bias")), bool(cfg.get("mlp_bias"))
    permute = arch == "llama"
    slots = [_Slot("model.embed_tokens.weight", "token_embd.weight", (vocab, hidden))]
    for i in range(cfg["num_hidden_layers"]):
        hf, gg = f"model.layers.{i}.", f"blk.{i}."
        projections: list[tuple[str, str, int, int, Literal["", "q", "k", "t"], bool]] = [
            ("self_attn.q_proj", "attn_q", heads * head_dim, hidden, "q" if permute else "", attn_bias),
            ("self_attn.k_proj", "attn_k", kv_heads * head_dim, hidden, "k" if permute else "", attn_bias),
            ("self_attn.v_proj", "attn_v", kv_heads * head_dim, hidden, "", attn_bias),
            ("self_attn.o_proj", "attn_output", hidden, heads * head_dim, "", attn_bias),
            ("mlp.gate_proj", "ffn_gate", inter, hidden, "", mlp_bias),
            ("mlp.up_proj", "ffn_up", inter, hidden, "", mlp_bias),
            ("mlp.down_proj", "ffn_down", hidden, inter, "", mlp_bias),
        ]
        slots.append(_Slot(hf + "input_layernorm.weight", gg + "attn_norm.weight", (hidden,)))
        for hf_name, gg_name, rows, cols, op, bias in projections:
            slots.append(_Slot(f"{hf}{hf_name}.weight", f"{gg}{gg_name}.weight", (rows, cols), op))
            if bias:
                slots.append(_Slot(f"{hf}{hf_name}.bias", f"{gg}{gg_name}.bias", (rows,), op))
        if arch == "qwen3":
            slots.append(_Slot(hf + "self_attn.q_norm.weight", gg + "attn_q_norm.weight", (head_dim,)))
            slots.append(_Slot(hf + "self_attn.k_norm.weight", gg + "attn_k_norm.weight", (head_dim,)))
        slots.append(_Slot(hf + "post_attention_layernorm.weight", gg + "ffn_norm.weight", (hidden,)))
    slots.append(_Slot("model.norm.weight", "output_norm.weight", (hidden,)))
    if not cfg["tie_word_embeddings"]:
        slots.append(_Slot("lm_head.weight", "output.weight", (vocab, hidden)))
    return slots


def _gpt2_slots(cfg: Mapping[str, Any]) -> list[_Slot]:
    """The tensors of a GPT-2 model with this config (``n_embd``, ``n_inner``, … as transformers names them).
    ``Conv1D`` weights are ``(in, out)`` in transformers and ``(out, in)`` in the file."""
    embd, vocab, positions = cfg["n_embd"], cfg["vocab_size"], cfg["n_positions"]
    inner = cfg.get("n_inner") or 4 * embd
    slots = [
        _Slot("transformer.wte.weight", "token_embd.weight", (vocab, embd)),
        _Slot("transformer.wpe.weight", "position_embd.weight", (positions, embd)),
    ]
    for i in range(cfg["n_layer"]):
        hf, gg = f"transformer.h.{i}.", f"blk.{i}."
        for hf_name, gg_name, shape in (
            ("ln_1", "attn_norm", None),
            ("attn.c_attn", "attn_qkv", (embd, 3 * embd)),
            ("attn.c_proj", "attn_output", (embd, embd)),
            ("ln_2", "ffn_norm", None),
            ("mlp.c_fc", "ffn_up", (embd, inner)),
            ("mlp.c_proj", "ffn_down", (inner, embd)),
        ):
            if shape is None:
                slots.append(_Slot(f"{hf}{hf_name}.weight", f"{gg}{gg_name}.weight", (embd,)))
                slots.append(_Slot(f"{hf}{hf_name}.bias", f"{gg}{gg_name}.bias", (embd,)))
            else:
                slots.append(_Slot(f"{hf}{hf_name}.weight", f"{gg}{gg_name}.weight", shape, "t"))
                slots.append(_Slot(f"{hf}{hf_name}.bias", f"{gg}{gg_name}.bias", (shape[1],)))
    slots.append(_Slot("transformer.ln_f.weight", "output_norm.weight", (embd,)))
    slots.append(_Slot("transformer.ln_f.bias", "output_norm.bias", (embd,)))
    if not cfg["tie_word_embeddings"]:
        slots.append(_Slot("lm_head.weight", "output.weight", (vocab, embd)))
    return slots


def _slots(arch: str, cfg: Mapping[str, Any]) -> list[_Slot]:
    return _gpt2_slots(cfg) if arch == "gpt2" else _decoder_slots(arch, cfg)


def _stored_shape(slot: _Slot) -> tuple[int, ...]:
    """The shape of the tensor in the file, row-major (the reverse of GGUF's ``ne`` order)."""
    return tuple(reversed(slot.shape)) if slot.op == "t" else slot.shape


def _rotary_groups(slot: _Slot, cfg: Mapping[str, Any]) -> int:
    """How many heads a permuted Q or K projection holds: ``permute(w, n_head, n_head_kv)`` in llama.cpp's
    converter uses ``n_head`` for Q and ``n_head_kv`` for K."""
    return int(cfg["num_attention_heads"] if slot.op == "q" else cfg["num_key_value_heads"])


def _to_interleaved(w: np.ndarray, groups: int) -> np.ndarray:
    """llama.cpp's ``permute``: per head, rows ``[x0 … x_{d/2-1}, y0 … y_{d/2-1}]`` (transformers' rotate-half
    halves) become ``[x0, y0, x1, y1, …]`` (pairs of adjacent rows, the interleaved rotary layout). Works on
    weights ``(rows, cols)`` and biases ``(rows,)``."""
    half = w.shape[0] // groups // 2
    return w.reshape(groups, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _to_rotate_half(w: np.ndarray, groups: int) -> np.ndarray:
    """The inverse of :func:`_to_interleaved`."""
    half = w.shape[0] // groups // 2
    return w.reshape(groups, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ---------------------------------------------------------------------------------------------------------
# Pre-tokenizers: llama.cpp's `tokenizer.ggml.pre` names, and the `tokenizers` pre-tokenizer each one means.

# GPT-2's split (the one `ByteLevel(use_regex=True)` applies) is llama.cpp's for `gpt-2` and, after a split
# of every digit on its own, for `smollm`. These two are the tokenizer.json regexes that llama.cpp adapts.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


class _Pre(NamedTuple):
    split: str  # "gpt2", "digits" (every digit alone, then GPT-2's), "llama3" or "qwen2"
    ignore_merges: bool  # a pre-token that is itself in the vocabulary is one token
    add_bos: bool  # llama.cpp's default when the file has no tokenizer.ggml.add_bos_token


# From llama-vocab.cpp: the names that select each split, with the flags llama.cpp sets for them.
_PRE_TYPES: dict[str, _Pre] = {
    **dict.fromkeys(
        ("gpt-2", "phi-2", "mpt", "olmo", "jais", "jina-es", "jina-de", "jina-v2-es", "jina-v2-de", "gigachat"),
        _Pre("gpt2", False, False),
    ),
    **dict.fromkeys(("a.x-4.0", "mellum", "exaone4", "trillion", "granite-docling"), _Pre("gpt2", False, False)),
    **dict.fromkeys(
        ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"),
        _Pre("digits", False, False),
    ),
    **dict.fromkeys(
        ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2", "jina-v5-nano"),
        _Pre("llama3", True, True),
    ),
    **dict.fromkeys(("dbrx", "smaug-bpe"), _Pre("llama3", False, False)),
    **dict.fromkeys(
        ("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez", "stablelm2", "hunyuan"),
        _Pre("qwen2", False, False),
    ),
}
# The name write_gguf gives each split (and, for llama3's, each ignore_merges).
_PRE_NAMES = {
    ("gpt2", False): "gpt-2",
    ("digits", False): "smollm",
    ("llama3", True): "llama-bpe",
    ("llama3", False): "smaug-bpe",
    ("qwen2", False): "qwen2",
}
# Text on which the four splits all differ: digit runs, whitespace runs before digits, contractions in
# capitals, punctuation runs before newlines, letters after punctuation, non-Latin scripts.
_PRE_PROBE = "Hello world's 1234567 x  89 I'LL DON'T naïve  \t\n\n  end!!!\n?? 'll (a)b\r\n中文 ½ 3.14 ..x"


def _pre_tokenizer(split: str) -> pre_tokenizers.PreTokenizer:
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split in ("gpt2", "digits"))
    if split == "gpt2":
        return byte_level
    if split == "digits":  # as SmolLM2's tokenizer.json: Digits(individual_digits=True), then ByteLevel
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    regex = _LLAMA3_SPLIT if split == "llama3" else _QWEN2_SPLIT
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(regex), behavior="isolated"), byte_level])


@cache
def _byte_spelling() -> dict[int, str]:
    """GPT-2's byte-to-unicode table: printable Latin-1 bytes stand for themselves, the others for
    U+0100 onwards in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    spelling, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            spelling[byte] = chr(byte)
        else:
            spelling[byte] = chr(256 + extra)
            extra += 1
    return spelling


def _byte_spelled(token: str) -> str:
    """A token in the byte-level alphabet: as is when it already is, else its UTF-8 bytes spelled."""
    alphabet = _byte_alphabet()
    if all(char in alphabet for char in token):
        return token
    spelling = _byte_spelling()
    return "".join(spelling[byte] for byte in token.encode("utf-8"))


@cache
def _byte_alphabet() -> frozenset[str]:
    return frozenset(_byte_spelling().values())


# ---------------------------------------------------------------------------------------------------------
# Reading.


def _gguf_module() -> Any:
    try:
        import gguf
    except ImportError:
        raise AnexaError("GGUF files need the gguf package: pip install gguf") from None
    return gguf


class _Truncated(Exception):
    """A read past the end of the file."""


def _open(path: Path) -> GGUFReader:
    """A ``GGUFReader`` over ``path`` whose every read stays inside the file: gguf's reader slices a memory
    map, so a truncated file or a corrupt length would otherwise read short arrays (or loop on empty ones)."""
    gguf = _gguf_module()
    if not path.is_file():
        raise AnexaError(f"{path} does not exist or is not a file: give the path of a .gguf model file")
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
    if head[:4] != b"GGUF":
        raise AnexaError(
            f"{path} is not a GGUF file (it does not start with the bytes 'GGUF'): give the path of a .gguf model file"
        )
    truncated = f"{path} is truncated or corrupt: its {size} bytes end before the data it describes; {_FIX_FILE}"
    if len(head) < 8:
        raise AnexaError(truncated)
    version = int.from_bytes(head[4:8], "little")
    if not version & 0xFFFF:  # a big-endian file, which gguf's reader byte-swaps
        version = int.from_bytes(head[4:8], "big")
    if version not in (2, 3):
        raise AnexaError(
            f"{path} is GGUF version {version}, which this reader does not handle (versions 2 and 3): "
            f"the file is corrupt, or newer than the gguf package; {_FIX_FILE} with a current llama.cpp"
        )

    class StrictReader(gguf.GGUFReader):  # type: ignore[name-defined]
        def _get(
            self,
            offset: int,
            dtype: npt.DTypeLike,
            count: int = 1,
            override_order: Literal["I", "S", "<"] | None = None,
        ) -> npt.NDArray[Any]:
            end = int(offset) + np.dtype(dtype).itemsize * int(count)
            if offset < 0 or count < 0 or end > len(self.data):
                raise _Truncated
            return super()._get(offset, dtype, count, override_order)

    try:
        with np.errstate(over="ignore"):  # a corrupt offset overflows (refused by _check_layout), not a warning
            reader: GGUFReader = StrictReader(path)
    except _Truncated:
        raise AnexaError(truncated) from None
    except (ValueError, KeyError, IndexError, TypeError, OverflowError, UnicodeDecodeError, MemoryError) as exc:
        detail = one_line(exc, 200)
        raise AnexaError(f"{path} is corrupt ({type(exc).__name__}: {detail}); {_FIX_FILE}") from None
    return reader


def _check_layout(reader: GGUFReader, layers: int, arch: str, path: Path) -> None:
    """Raises :class:`AnexaError` unless the tensors hold exactly ``layers`` layers (checked before a slot
    per layer is built: a corrupt count of 10**12 would build them for minutes) and every tensor's data lies
    inside the file, at a multiple of the file's alignment, overlapping no other tensor's (gguf's reader adds
    a corrupt offset near 2**64 to the data's start without a check, and would read another tensor's bytes)."""
    found = {int(match.group(1)) for tensor in reader.tensors if (match := re.match(r"blk\.(\d+)\.", tensor.name))}
    if layers != len(found):
        raise AnexaError(
            f"{path} has metadata {arch}.block_count = {layers} but tensors for {len(found)} layers: the file "
            f"does not match its metadata; {_FIX_FILE}"
        )
    spans = []
    for tensor in reader.tensors:
        offset = int(tensor.field.parts[-1][0])  # as stored, relative to the data section
        spans.append((offset, offset + int(tensor.n_bytes), tensor.name))
        if offset % reader.alignment or reader.data_offset + offset + int(tensor.n_bytes) > len(reader.data):
            raise AnexaError(f"{path} is corrupt (tensor {tensor.name!r} has data offset {offset}); {_FIX_FILE}")
    spans.sort()
    for (_, end, first), (start, _, second) in itertools.pairwise(spans):
        if start < end:
            raise AnexaError(f"{path} is corrupt (tensors {first!r} and {second!r} share bytes); {_FIX_FILE}")


def _metadata(reader: GGUFReader, path: Path) -> dict[str, Any]:
    """Every metadata entry as Python values (strings, numbers, lists)."""
    values: dict[str, Any] = {}
    for key, entry in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            values[key] = entry.contents()
        except (ValueError, UnicodeDecodeError, IndexError) as exc:
            detail = one_line(exc, 120)
            raise AnexaError(f"{path} is corrupt (metadata {key!r}: {detail}); {_FIX_FILE}") from None
    return values


_HUB_URL = re.compile(r"https://huggingface\.co/([A-Za-z0-9][\w.-]*/[\w.-]+)/?")


def hub_repository(metadata: Mapping[str, Any]) -> str | None:
    """The Hugging Face repository (``ORG/NAME``) a GGUF file's metadata names as its source — the
    ``general.source.repo_url`` it was converted from, else its ``general.base_model.0.repo_url`` (llama.cpp's
    naming convention) — when that is a ``https://huggingface.co/ORG/NAME`` address; ``None`` otherwise."""
    for key in ("general.source.repo_url", "general.base_model.0.repo_url"):
        found = _HUB_URL.fullmatch(str(metadata.get(key, "")))
        if found:
            return found.group(1)
    return None


def tidy_float(value: float) -> float:
    """A float32 metadata value as the shortest decimal that is the same float32 (``1e-05``, not
    ``9.999999747378752e-06``), as the model's config.json had it."""
    return float(np.format_float_positional(np.float32(value), unique=True, trim="-"))


def _require(meta: Mapping[str, Any], key: str, path: Path, kind: type = int) -> Any:
    value = meta.get(key)
    if value is None:
        raise AnexaError(
            f"{path} lacks metadata {key!r}, which a {meta['general.architecture']} model needs; {_FIX_FILE}"
        )
    if kind is int and not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
        raise AnexaError(f"{path} has metadata {key!r} = {value!r}, not a positive whole number; {_FIX_FILE}")
    if kind is float and not isinstance(value, (int, float)):
        raise AnexaError(f"{path} has metadata {key!r} = {value!r}, not a number; {_FIX_FILE}")
    return value


def _hf_config(arch: str, meta: Mapping[str, Any], names: set[str], vocab: int, path: Path) -> dict[str, Any]:
    """transformers' config dict from llama.cpp's metadata keys (``{arch}.block_count``, …)."""
    # Why long: two literal config dicts, GPT-2's and the Llama family's (llama, qwen3), each key beside the GGUF
    # key it comes from, with the Llama family's attention and rope checks between; a table would hide that map.

    def key(name: str, kind: type = int) -> Any:
        return _require(meta, f"{arch}.{name}", path, kind)

    tied = "output.weight" not in names
    ids = {
        f"{name}_token_id": meta.get(f"tokenizer.ggml.{gguf_name}_token_id")
        for name, gguf_name in (("bos", "bos"), ("eos", "eos"), ("pad", "padding"))
    }
    token_ids = {name: value for name, value in ids.items() if value is not None}
    if arch == "gpt2":
        embd, positions = key("embedding_length"), key("context_length")
        inner = key("feed_forward_length")
        return {
            "architectures": [_HF_CLASSES[arch]],
            "model_type": "gpt2",
            "vocab_size": vocab,
            "n_embd": embd,
            "n_layer": key("block_count"),
            "n_head": key("attention.head_count"),
            "n_positions": positions,
            "n_ctx": positions,
            "n_inner": None if inner == 4 * embd else inner,
            "layer_norm_epsilon": tidy_float(key("attention.layer_norm_epsilon", float)),
            "activation_function": "gelu_new",  # llama.cpp's GELU is the tanh approximation
            "tie_word_embeddings": tied,
            **token_ids,
        }
    hidden, heads = key("embedding_length"), key("attention.head_count")
    kv_heads = meta.get(f"{arch}.attention.head_count_kv", heads)
    default_head_dim = hidden // heads
    if arch == "llama":  # llama.cpp: n_rot = rope.dimension_count, the whole head in Llama models
        default_head_dim = meta.get(f"{arch}.rope.dimension_count", default_head_dim)
    head_dim = meta.get(f"{arch}.attention.key_length", default_head_dim)
    if not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in (kv_heads, head_dim)):
        raise AnexaError(
            f"{path} has malformed attention metadata (heads {kv_heads!r}, head size {head_dim!r}); {_FIX_FILE}"
        )
    if meta.get(f"{arch}.rope.scaling.type", "none") not in ("none", None) or "rope_freqs.weight" in names:
        raise AnexaError(
            f"{path} uses rope scaling ({meta.get(f'{arch}.rope.scaling.type', 'rope_freqs')}), which Anexa's "
            "GGUF import does not support: import the model from its Hugging Face folder instead"
        )
    theta = tidy_float(
        _require(meta, f"{arch}.rope.freq_base", path, float) if f"{arch}.rope.freq_base" in meta else 10000.0
    )
    return {
        "architectures": [_HF_CLASSES[arch]],
        "model_type": arch,
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": key("feed_forward_length"),
        "num_hidden_layers": key("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "max_position_embeddings": key("context_length"),
        "rms_norm_eps": tidy_float(key("attention.layer_norm_rms_epsilon", float)),
        "rope_theta": theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": theta},
        "hidden_act": "silu",
        "attention_bias": "blk.0.attn_q.bias" in names,
        **({"mlp_bias": "blk.0.ffn_gate.bias" in names} if arch == "llama" else {}),
        "tie_word_embeddings": tied,
        **token_ids,
    }


def _dequantized(tensor: Any, path: Path) -> np.ndarray:
    """The tensor's values as a float32 array in row-major shape (the reverse of GGUF's ``ne``)."""
    gguf = _gguf_module()
    kind = tensor.tensor_type
    try:
        values = gguf.quants.dequantize(tensor.data, kind)
    except NotImplementedError:
        raise AnexaError(
            f"{path}: tensor {tensor.name!r} has type {kind.name}, which the gguf package cannot dequantize: "
            "convert the model with float (F32, F16, BF16) or standard quantized (Q4_0 … Q8_0, K-quant, IQ) types"
        ) from None
    shape = tuple(reversed(tensor.shape.tolist()))
    if np.may_share_memory(values, tensor.data):  # F32: a view of the file's map
        return np.array(values, dtype=np.float32).reshape(shape)
    return np.ascontiguousarray(values, dtype=np.float32).reshape(shape)


def read_gguf(path: str | os.PathLike[str]) -> GGUFModel:
    """Read a GGUF model file into transformers' representation (see :class:`GGUFModel`).

    Every tensor type ``gguf.quants.dequantize`` handles is read (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1,
    Q8_0, the K-quants, the IQ types, …) and returned as float32. Llama's Q and K projections are un-permuted
    from llama.cpp's interleaved rotary layout back to transformers' rotate-half one; GPT-2's ``Conv1D``
    weights are transposed back to ``(in, out)``; an output tensor equal to the embedding counts as tied.

    Raises :class:`AnexaError` (one line, saying what to do) when the path is not a GGUF file, the file is
    truncated or corrupt, a tensor's type cannot be dequantized, the architecture is not ``llama``, ``qwen3``
    or ``gpt2``, the tokenizer is not byte-level BPE (``gpt2``) with a known pre-tokenizer, or the tensors
    (names or shapes) do not match the metadata.
    """
    # Why complex: one check per way a file can fail to be a model Anexa reads (architecture, tokenizer model,
    # vocabulary, tensor names, shapes), each with its own message, in the order the file is read.
    path = Path(path)
    reader = _open(path)
    meta = _metadata(reader, path)
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise AnexaError(
            f"{path} holds a {arch!r} model; Anexa reads GGUF models of architecture "
            f"{', '.join(map(repr, SUPPORTED_ARCHITECTURES))} only: pick a model of one of those"
        )
    model = meta.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise AnexaError(
            f"{path} has tokenizer model {model!r}; Anexa reads GGUF tokenizers of model 'gpt2' (byte-level BPE) "
            "only: pick a model with a byte-level BPE tokenizer, or import it from its Hugging Face folder"
        )
    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens:
        raise AnexaError(f"{path} has no vocabulary (tokenizer.ggml.tokens); {_FIX_FILE}")
    pre = _pre_type(meta, path)
    vocab = meta.get(f"{arch}.vocab_size", len(tokens))  # llama.cpp pads the token list to it, when it is given
    if not isinstance(vocab, int) or vocab < len(tokens):
        raise AnexaError(f"{path} has {len(tokens)} tokens but a vocabulary of {vocab!r}; {_FIX_FILE}")
    by_name = {tensor.name: tensor for tensor in reader.tensors}
    cfg = _hf_config(arch, meta, set(by_name), vocab, path)
    _check_layout(reader, cfg["n_layer" if arch == "gpt2" else "num_hidden_layers"], arch, path)
    tied_copy = _output_is_embedding(by_name)
    if tied_copy:
        cfg["tie_word_embeddings"] = True
    slots = _slots(arch, cfg)
    expected = {slot.gguf for slot in slots} | ({"output.weight"} if tied_copy else set())
    for name in by_name:
        if name not in expected:
            raise AnexaError(
                f"{path} has tensor {name!r}, which is not part of a {arch} model with this metadata "
                f"(block_count {meta.get(f'{arch}.block_count')}): the file does not match its metadata; {_FIX_FILE}"
            )
    tensors: dict[str, torch.Tensor] = {}
    for slot in slots:
        tensor = by_name.get(slot.gguf)
        if tensor is None:
            raise AnexaError(
                f"{path} lacks tensor {slot.gguf!r}, which a {arch} model with this metadata has; {_FIX_FILE}"
            )
        stored = tuple(reversed(tensor.shape.tolist()))
        if stored != _stored_shape(slot):
            raise AnexaError(
                f"{path}: tensor {slot.gguf!r} has shape {stored} but the metadata implies {_stored_shape(slot)}: "
                f"the file does not match its metadata; {_FIX_FILE}"
            )
        values = _dequantized(tensor, path)
        if slot.op in ("q", "k"):
            values = _to_rotate_half(values, _rotary_groups(slot, cfg))
        elif slot.op == "t":
            values = values.T
        tensors[slot.hf] = torch.from_numpy(np.ascontiguousarray(values))
    tokenizer = _tokenizer_state(meta, pre, path)
    types = Counter(tensor.tensor_type.name for tensor in reader.tensors)
    return GGUFModel(cfg, tensors, tokenizer, _summary(meta, types, arch, reader))


def _output_is_embedding(by_name: Mapping[str, Any]) -> bool:
    """Whether the file's output projection is a copy of the token embedding (older llama.cpp converters
    wrote GPT-2's tied ``lm_head`` out again): then the model is tied."""
    output, embedding = by_name.get("output.weight"), by_name.get("token_embd.weight")
    if output is None or embedding is None or output.tensor_type != embedding.tensor_type:
        return False
    return bool(output.data.shape == embedding.data.shape and np.array_equal(output.data, embedding.data))


def _summary(meta: Mapping[str, Any], types: Counter[str], arch: str, reader: GGUFReader) -> dict[str, Any]:
    gguf = _gguf_module()
    bulky = {"tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.ggml.scores"}
    summary = {key: value for key, value in meta.items() if key not in bulky and key != "tokenizer.chat_template"}
    file_type = meta.get("general.file_type")
    try:
        summary["file_type"] = gguf.LlamaFileType(file_type).name if file_type is not None else None
    except ValueError:
        summary["file_type"] = None
    summary["tensor_types"] = dict(types.most_common())
    summary["context_length"] = meta.get(f"{arch}.context_length")
    summary["parameters"] = sum(int(tensor.n_elements) for tensor in reader.tensors)
    return summary


def _pre_type(meta: Mapping[str, Any], path: Path) -> _Pre:
    name = meta.get("tokenizer.ggml.pre")
    pre = _PRE_TYPES.get(name) if isinstance(name, str) else None
    if pre is None:
        known = ", ".join(sorted(_PRE_TYPES))
        raise AnexaError(
            f"{path} has pre-tokenizer {name!r}, which Anexa's GGUF import does not know (it knows {known}): "
            "import the model from its Hugging Face folder instead"
        )
    return pre


def _tokenizer_state(meta: Mapping[str, Any], pre: _Pre, path: Path) -> dict[str, Any]:
    """The ``hf`` tokenizer plugin's state for a byte-level BPE vocabulary read from GGUF metadata."""
    # Why complex: the vocabulary's token kinds (control, user-defined, normal) and then each special and
    # end-of-turn token read from optional metadata; most of the count is guards for keys a file may lack.
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens)
    merges = meta.get("tokenizer.ggml.merges")
    well_typed = all(isinstance(t, str) for t in tokens) and all(isinstance(t, int) for t in types)
    if len(types) != len(tokens) or not isinstance(merges, list) or not well_typed:
        raise AnexaError(
            f"{path} has a malformed tokenizer ({len(tokens)} tokens, {len(types)} token types, "
            f"{'no' if not isinstance(merges, list) else len(merges)} merges, "
            f"{'text' if well_typed else 'not text'}); {_FIX_FILE}"
        )
    if not all(isinstance(merge, str) for merge in merges):
        raise AnexaError(f"{path} has a malformed merge (not text); {_FIX_FILE}")
    pairs = [tuple(merge.split(" ")) for merge in merges]
    if any(len(pair) != 2 for pair in pairs):
        raise AnexaError(f"{path} has a malformed merge (not two tokens joined by a space); {_FIX_FILE}")
    vocab: dict[str, int] = {}
    added: list[AddedToken] = []
    for index, (token, kind) in enumerate(zip(tokens, types, strict=True)):
        # Control and user-defined tokens are matched whole in the text, before BPE: they stay as written.
        whole = kind in (_CONTROL, _USER_DEFINED)
        key = token if whole else _byte_spelled(token)
        if key in vocab:  # a duplicate spelling: the id still needs an entry
            key = f"[PAD{index}]"
        vocab[key] = index
        if whole:
            added.append(AddedToken(key, special=kind == _CONTROL, normalized=False))
    try:
        tokenizer = Tokenizer(models.BPE(vocab, pairs, ignore_merges=pre.ignore_merges))
    except Exception as exc:  # tokenizers raises plain Exception ("Token 'Ġthe' out of vocabulary")
        detail = one_line(exc, 160)
        raise AnexaError(f"{path} has a tokenizer that cannot be built ({detail}); {_FIX_FILE}") from None
    tokenizer.pre_tokenizer = _pre_tokenizer(pre.split)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.add_special_tokens([token for token in added if token.special])
    tokenizer.add_tokens([token for token in added if not token.special])

    def text(key: str) -> str | None:
        index = meta.get(f"tokenizer.ggml.{key}")
        return tokenizer.id_to_token(index) if isinstance(index, int) and 0 <= index < len(tokens) else None

    special = {
        "bos_token": text("bos_token_id"),
        "eos_token": text("eos_token_id"),
        "unk_token": text("unknown_token_id"),
        "pad_token": text("padding_token_id"),
    }
    template = meta.get("tokenizer.chat_template")
    template = template if isinstance(template, str) else None
    ends = [text("eot_token_id"), text("eom_token_id")]
    whole_tokens = {tokens[i] for i, kind in enumerate(types) if kind in (_CONTROL, _USER_DEFINED)}
    ends += [t for t in _END_OF_TURN_TEXTS if template and t in template and t in whole_tokens]
    eos_tokens = [t for t in dict.fromkeys(ends) if t is not None and t != special["eos_token"]]
    add_bos = meta.get("tokenizer.ggml.add_bos_token")
    return {
        "type": "hf",
        "tokenizer": tokenizer.to_str(),
        "special_tokens": special,
        "eos_tokens": eos_tokens,
        "add_bos": bool(pre.add_bos if add_bos is None else add_bos),
        "chat_template": template,
    }


# ---------------------------------------------------------------------------------------------------------
# Writing.


def _config_arch(cfg: Mapping[str, Any], where: str) -> str:
    classes = cfg.get("architectures") or []
    arch = next((_ARCH_OF_CLASS[c] for c in classes if c in _ARCH_OF_CLASS), None)
    if arch is None and cfg.get("model_type") in _HF_CLASSES:
        arch = str(cfg["model_type"])
    if arch is None:
        named = ", ".join(map(str, classes)) or repr(cfg.get("model_type"))
        raise AnexaError(
            f"cannot write {where}: the config is a {named} model; Anexa writes GGUF for "
            f"{', '.join(_HF_CLASSES.values())} only"
        )
    return arch


def _write_config(arch: str, hf: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The config values the file needs, checked, with transformers' defaults where the config leaves one out."""
    # Why complex: one branch per config key of GPT-2 and of the Llama family, each falling back to transformers'
    # default when absent, then one refusal per feature llama.cpp lacks; a table would hide which family reads what.

    def need(key: str, kind: type = int) -> Any:
        value = hf.get(key)
        ok = isinstance(value, (int, float)) if kind is float else isinstance(value, int) and value > 0
        if value is None or isinstance(value, bool) or not ok:
            raise AnexaError(
                f"cannot write {where}: the config's {key!r} is {value!r}, not a "
                f"{'number' if kind is float else 'positive whole number'}: pass the model's transformers config"
            )
        return value

    if arch == "gpt2":
        cfg = {key: need(key) for key in ("vocab_size", "n_embd", "n_layer", "n_head", "n_positions")}
        cfg["n_inner"] = hf.get("n_inner") or 4 * cfg["n_embd"]
        cfg["layer_norm_epsilon"] = need("layer_norm_epsilon", float) if "layer_norm_epsilon" in hf else 1e-5
        cfg["tie_word_embeddings"] = bool(hf.get("tie_word_embeddings", True))
        activation = hf.get("activation_function", "gelu_new")
        if activation not in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
            raise AnexaError(
                f"cannot write {where}: GPT-2 activation {activation!r} is not llama.cpp's tanh GELU (gelu_new)"
            )
        if cfg["n_embd"] % cfg["n_head"]:
            raise AnexaError(
                f"cannot write {where}: n_embd {cfg['n_embd']} is not a multiple of n_head {cfg['n_head']}"
            )
        return cfg
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    cfg = {key: need(key) for key in keys}
    cfg["num_key_value_heads"] = (
        need("num_key_value_heads") if hf.get("num_key_value_heads") else cfg["num_attention_heads"]
    )
    # Without head_dim, transformers' defaults: hidden_size / heads for Llama, 128 for Qwen3.
    default_head_dim = 128 if arch == "qwen3" else cfg["hidden_size"] // cfg["num_attention_heads"]
    cfg["head_dim"] = need("head_dim") if hf.get("head_dim") else default_head_dim
    cfg["max_position_embeddings"] = need("max_position_embeddings")
    cfg["rms_norm_eps"] = need("rms_norm_eps", float) if "rms_norm_eps" in hf else 1e-6
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, Mapping) else rope
    if rope_type not in ("default", None):
        raise AnexaError(f"cannot write {where}: rope type {rope_type!r} is not supported (only 'default' rope)")
    theta = hf.get("rope_theta") or (rope.get("rope_theta") if isinstance(rope, Mapping) else None) or 10000.0
    cfg["rope_theta"] = float(theta)
    cfg["attention_bias"] = bool(hf.get("attention_bias", False))
    cfg["mlp_bias"] = bool(hf.get("mlp_bias", False)) if arch == "llama" else False
    cfg["tie_word_embeddings"] = bool(hf.get("tie_word_embeddings", False))
    if hf.get("hidden_act", "silu") != "silu":
        raise AnexaError(
            f"cannot write {where}: activation {hf.get('hidden_act')!r} is not SiLU, which llama.cpp's {arch} uses"
        )
    if hf.get("use_sliding_window"):
        raise AnexaError(f"cannot write {where}: sliding-window attention is not supported")
    if cfg["num_attention_heads"] % cfg["num_key_value_heads"] or (arch == "llama" and cfg["head_dim"] % 2):
        raise AnexaError(f"cannot write {where}: the attention heads do not divide evenly (heads, KV heads, head size)")
    return cfg


def _checked_tensors(
    slots: list[_Slot], tensors: Mapping[str, torch.Tensor], cfg: Mapping[str, Any], arch: str, where: str
) -> dict[str, torch.Tensor]:
    """The tensors by transformers' name, checked against the slots of the config."""
    # Why complex: the checks in the order a mismatch is best reported: GPT-2's mask buffers dropped, a tied head
    # compared, then each tensor unknown or not float, then each slot missing or misshapen.
    embedding = slots[0].hf
    tensors = dict(tensors)
    for name in list(tensors):
        if name.endswith((".attn.bias", ".attn.masked_bias")) and arch == "gpt2":
            del tensors[name]  # GPT-2's causal-mask buffers, not weights (llama.cpp's converter drops them)
    if cfg["tie_word_embeddings"] and "lm_head.weight" in tensors:
        head = tensors.pop("lm_head.weight")
        if embedding in tensors and not torch.equal(head.to(torch.float32), tensors[embedding].to(torch.float32)):
            raise AnexaError(
                f"cannot write {where}: lm_head.weight differs from {embedding} but the config ties them: "
                "set tie_word_embeddings to false"
            )
    by_slot = {slot.hf for slot in slots}
    for name, value in tensors.items():
        if name not in by_slot:
            raise AnexaError(
                f"cannot write {where}: tensor {name!r} is not part of a {_HF_CLASSES[arch]} with this config: "
                "remove it or fix the config"
            )
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise AnexaError(f"cannot write {where}: tensor {name!r} is not a floating-point torch tensor")
    for slot in slots:
        if slot.hf not in tensors:
            raise AnexaError(f"cannot write {where}: tensor {slot.hf!r} is missing: pass every weight of the model")
        shape = tuple(tensors[slot.hf].shape)
        if shape != slot.shape:
            raise AnexaError(
                f"cannot write {where}: tensor {slot.hf!r} has shape {shape} but the config implies {slot.shape}: "
                "the tensors do not match the config"
            )
    return tensors


class _Vocab(NamedTuple):
    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str
    ids: dict[str, int]


def _write_vocab(state: Mapping[str, Any], vocab_size: int, where: str) -> _Vocab:
    """The GGUF vocabulary of an ``hf`` tokenizer state: ``vocab_size`` tokens (holes and padding as
    ``[PAD{id}]``, type unused, as llama.cpp's converter writes them), merges, and the pre-tokenizer name,
    found by running the tokenizer's pre-tokenizer on a probe text. A normalizer (Qwen2's NFC) is not
    stored: GGUF has no field for it, and llama.cpp's converter drops it too."""
    # Why complex: refuses each tokenizer llama.cpp would read differently (not hf, malformed, not byte-level BPE,
    # an unknown pre-tokenizer split, too many tokens), one message each, before it lists the vocabulary.
    if not isinstance(state, Mapping) or state.get("type") != "hf" or not isinstance(state.get("tokenizer"), str):
        kind = state.get("type") if isinstance(state, Mapping) else type(state).__name__
        raise AnexaError(
            f"cannot write {where}: tokenizer {kind!r} cannot go into a GGUF file; only the 'hf' tokenizer "
            "(byte-level BPE) of an imported model can"
        )
    try:
        spec = json.loads(state["tokenizer"])
        tokenizer = Tokenizer.from_str(state["tokenizer"])
    except Exception as exc:
        detail = one_line(exc, 120)
        raise AnexaError(f"cannot write {where}: the tokenizer state is malformed ({detail})") from None
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise AnexaError(
            f"cannot write {where}: the tokenizer is a {model.get('type')} model; GGUF's 'gpt2' tokenizer "
            "is byte-level BPE only"
        )
    pre = tokenizer.pre_tokenizer
    pieces = [piece for piece, _ in pre.pre_tokenize_str(_PRE_PROBE)] if pre is not None else None
    split = next(
        (s for s in ("gpt2", "digits", "llama3", "qwen2") if pieces == _split_pieces(s)),
        None,
    )
    name = _PRE_NAMES.get((split, bool(model.get("ignore_merges")))) if split else None
    if name is None:
        raise AnexaError(
            f"cannot write {where}: the tokenizer's pre-tokenizer is none of llama.cpp's byte-level splits "
            "(gpt-2, smollm, llama-bpe, qwen2), so llama.cpp would split text differently"
        )
    tokens: dict[int, tuple[str, int]] = {index: (token, _NORMAL) for token, index in model.get("vocab", {}).items()}
    for entry in spec.get("added_tokens") or []:
        tokens[int(entry["id"])] = (entry["content"], _CONTROL if entry.get("special") else _USER_DEFINED)
    size = max(tokens) + 1 if tokens else 0
    if size > vocab_size:
        raise AnexaError(
            f"cannot write {where}: the tokenizer has {size} tokens but the config's vocab_size is {vocab_size}: "
            "they must belong to the same model"
        )
    listed = [tokens.get(index, (f"[PAD{index}]", _UNUSED)) for index in range(vocab_size)]
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in model.get("merges") or []]
    ids = {token: index for index, (token, _) in enumerate(listed)}
    return _Vocab([t for t, _ in listed], [k for _, k in listed], merges, name, ids)


@cache
def _split_pieces(split: str) -> list[str]:
    return [piece for piece, _ in _pre_tokenizer(split).pre_tokenize_str(_PRE_PROBE)]


def _quantizer(dtype: str) -> Callable[[str, np.ndarray], tuple[np.ndarray, Any]]:
    """How each tensor is stored: 1-D tensors (norms, biases) stay F32, as llama.cpp keeps them; matrices
    become F16, or Q8_0 where their rows are whole 32-value blocks (F16 otherwise, as llama.cpp falls back)."""
    gguf = _gguf_module()
    types = gguf.GGMLQuantizationType

    def store(name: str, values: np.ndarray) -> tuple[np.ndarray, Any]:
        if dtype == "f32" or values.ndim == 1:
            return values.astype(np.float32, copy=False), types.F32
        if dtype == "q8_0" and values.shape[-1] % 32 == 0:
            return gguf.quants.quantize(values.astype(np.float32, copy=False), types.Q8_0), types.Q8_0
        return values.astype(np.float16), types.F16

    return store


def write_gguf(
    path: str | os.PathLike[str],
    hf_config: Mapping[str, Any],
    tensors: Mapping[str, torch.Tensor],
    tokenizer: Mapping[str, Any],
    *,
    name: str,
    dtype: str = "f32",
    license: str | None = None,
    base_model: Mapping[str, str] | None = None,
    sampling: Mapping[str, Any] | None = None,
) -> None:
    """Write a model in transformers' representation as a GGUF file llama.cpp (and transformers) can load.

    ``hf_config``: transformers' config dict of a ``LlamaForCausalLM``, ``Qwen3ForCausalLM`` or
    ``GPT2LMHeadModel``. ``tensors``: every weight under transformers' names and shapes (any float dtype;
    ``lm_head.weight`` may be left out, or equal the embedding, when the config ties them; GPT-2's
    ``attn.bias`` mask buffers are ignored). ``tokenizer``: the state dict of Anexa's ``hf`` tokenizer
    (byte-level BPE with a GPT-2, SmolLM, Llama-3 or Qwen2 split). ``name``: ``general.name``;
    ``license``: ``general.license``; ``base_model``: the model it derives from, ``name`` and optionally
    ``organization`` and ``repo_url`` (``general.base_model.0.*``, llama.cpp's naming convention);
    ``sampling``: recommended sampling as :func:`anexa_core.io.generation_config.to_gguf` gives it
    (``general.sampling.*``).
    ``dtype``: ``"f32"`` (exact), ``"f16"`` or ``"q8_0"`` for the matrices; norms and biases stay F32.

    llama.cpp's names and layout: ``token_embd``, ``blk.N.attn_q`` … ``ffn_down``, ``output_norm``,
    ``output`` (only when untied); Llama's Q/K rows permuted to the interleaved rotary layout; GPT-2's
    ``Conv1D`` weights transposed. The file is written beside ``path`` and renamed over it when complete.

    Raises :class:`AnexaError` (one line) for an unsupported architecture, config or dtype, tensors missing,
    extra or of the wrong shape, or a tokenizer GGUF cannot hold; nothing is written then. A failure while
    writing leaves no file behind (and an existing ``path`` untouched).
    """
    gguf = _gguf_module()
    path = Path(path)
    where = str(path)
    if dtype not in WRITE_DTYPES:
        raise AnexaError(f"cannot write {where}: unknown dtype {dtype!r}: {choose_one_of(dtype, WRITE_DTYPES)}")
    arch = _config_arch(hf_config, where)
    cfg = _write_config(arch, hf_config, where)
    slots = _slots(arch, cfg)
    checked = _checked_tensors(slots, tensors, cfg, arch, where)
    vocab = _write_vocab(tokenizer, cfg["vocab_size"], where)
    store = _quantizer(dtype)

    def arrays() -> Iterator[tuple[str, np.ndarray, Any]]:
        for slot in slots:
            values = checked[slot.hf].detach().to("cpu", torch.float32).contiguous().numpy()
            if slot.op in ("q", "k"):
                values = _to_interleaved(values, _rotary_groups(slot, cfg))
            elif slot.op == "t":
                values = values.T
            stored, kind = store(slot.gguf, np.ascontiguousarray(values))
            yield slot.gguf, stored, kind

    try:
        with atomic_path(path) as tmp:
            writer = gguf.GGUFWriter(tmp, arch)
            try:
                _add_general_keys(writer, name, dtype, license, base_model)
                for field, value in (sampling or {}).items():
                    getattr(writer, _SAMPLING_WRITERS[field])(value)
                _add_architecture_keys(writer, arch, cfg)
                _add_tokenizer_keys(writer, vocab, tokenizer)
                for tensor_name, stored, kind in arrays():
                    writer.add_tensor(tensor_name, stored, raw_dtype=kind)
                writer.write_header_to_file()
                writer.write_kv_data_to_file()
                writer.write_tensors_to_file()
            finally:
                writer.close()
    except OSError as exc:
        raise AnexaError(f"cannot write {where}: {exc.strerror or exc}: free space or pick another folder") from None


_SAMPLING_WRITERS = {
    "temperature": "add_sampling_temp",
    "top_k": "add_sampling_top_k",
    "top_p": "add_sampling_top_p",
    "min_p": "add_sampling_min_p",
    "repetition_penalty": "add_sampling_penalty_repeat",
    "repetition_penalty_window": "add_sampling_penalty_last_n",
}
"""The ``GGUFWriter`` method that writes each recommended-sampling field (its ``general.sampling.*`` key)."""


def _add_general_keys(
    writer: Any, name: str, dtype: str, license: str | None, base_model: Mapping[str, str] | None
) -> None:
    """``general.*``: the name, type, file type (and quantization version), licence and base model."""
    gguf = _gguf_module()
    writer.add_name(name)
    writer.add_type("model")
    if license:
        writer.add_license(license)
    if base_model:
        writer.add_base_model_count(1)
        writer.add_base_model_name(0, base_model["name"])
        if base_model.get("organization"):
            writer.add_base_model_organization(0, base_model["organization"])
        if base_model.get("repo_url"):
            writer.add_base_model_repo_url(0, base_model["repo_url"])
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16}.get(
        dtype, gguf.LlamaFileType.MOSTLY_Q8_0
    )
    writer.add_file_type(int(file_type))
    if dtype == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


# llama.cpp's hyperparameter keys ({arch}.block_count, …): the GGUFWriter method that writes each, and the
# transformers config field it takes its value from.
_ARCHITECTURE_KEYS = {
    "gpt2": (
        ("add_context_length", "n_positions"),
        ("add_embedding_length", "n_embd"),
        ("add_feed_forward_length", "n_inner"),
        ("add_block_count", "n_layer"),
        ("add_head_count", "n_head"),
        ("add_layer_norm_eps", "layer_norm_epsilon"),
    ),
    "llama": (
        ("add_context_length", "max_position_embeddings"),
        ("add_embedding_length", "hidden_size"),
        ("add_feed_forward_length", "intermediate_size"),
        ("add_block_count", "num_hidden_layers"),
        ("add_head_count", "num_attention_heads"),
        ("add_head_count_kv", "num_key_value_heads"),
        ("add_key_length", "head_dim"),
        ("add_value_length", "head_dim"),
        ("add_rope_dimension_count", "head_dim"),
        ("add_rope_freq_base", "rope_theta"),
        ("add_layer_norm_rms_eps", "rms_norm_eps"),
    ),
}


def _add_architecture_keys(writer: Any, arch: str, cfg: Mapping[str, Any]) -> None:
    """llama.cpp's hyperparameter keys for the config (:data:`_ARCHITECTURE_KEYS`)."""
    writer.add_vocab_size(cfg["vocab_size"])
    for method, name in _ARCHITECTURE_KEYS["gpt2" if arch == "gpt2" else "llama"]:
        getattr(writer, method)(cfg[name])


def _add_tokenizer_keys(writer: Any, vocab: _Vocab, state: Mapping[str, Any]) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    special = state.get("special_tokens") or {}
    for key, add in (
        ("bos_token", writer.add_bos_token_id),
        ("eos_token", writer.add_eos_token_id),
        ("unk_token", writer.add_unk_token_id),
        ("pad_token", writer.add_pad_token_id),
    ):
        token = special.get(key)
        index = vocab.ids.get(token) if isinstance(token, str) else None
        if index is not None:
            add(index)
    ends = [vocab.ids[t] for t in state.get("eos_tokens") or [] if isinstance(t, str) and t in vocab.ids]
    if ends:
        writer.add_eot_token_id(ends[0])
    writer.add_add_bos_token(bool(state.get("add_bos", False)))
    template = state.get("chat_template")
    if isinstance(template, str):
        writer.add_chat_template(template)
