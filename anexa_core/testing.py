"""The conformance kit: what every plugin of a kind must do, as functions a plugin's own tests call.

    from anexa_core.testing import check_attention
    from anexa_sliding import SlidingWindow

    def test_conforms():
        check_attention(SlidingWindow, window=4)

Each ``check_*`` takes the registered factory and options (as keyword arguments), runs the
contract on small random inputs, and raises ``AssertionError`` naming the first broken rule. The
references here are written out independently of the built-in plugins, so the built-ins are checked
against them too.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

import torch

from anexa_core import options as plugin_options
from anexa_core.config import ModelConfig, TrainConfig
from anexa_core.model.cache import KVCache
from anexa_core.model.gpt import GPT, Attend

ATTENTION_SHAPES = [  # (batch, heads, query length, key length, head dim)
    (1, 1, 1, 1, 16),
    (2, 3, 7, 7, 16),
    (1, 2, 3, 9, 32),  # decoding with a cache: q shorter than k
    (1, 1, 1, 12, 16),
    (2, 2, 16, 16, 64),
]


GROUPED_QUERY_SHAPES = [  # (batch, query heads, key/value heads, query length, key length, head dim)
    (2, 4, 2, 7, 7, 16),
    (1, 6, 1, 3, 9, 32),  # multi-query, decoding with a cache
    (2, 4, 1, 1, 12, 16),
]
RAGGED_SHAPES = [  # (query length, head dim, valid keys per row): rows of one batch at different lengths
    (1, 16, [10, 4, 1]),  # batched decoding: one new token per row
    (3, 16, [9, 5, 3]),  # a chunk of three new tokens per row
]


def _build(factory: Any, options: dict[str, Any]) -> Any:
    """The object a plugin's registered factory makes with ``options``, as the plugin manager would."""
    return plugin_options.create(getattr(factory, "__name__", "plugin"), factory, options)[0]


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, lengths: torch.Tensor | None = None
) -> torch.Tensor:
    """softmax(QKᵀ/√d)·V in float64 with the bottom-right causal mask (Vaswani et al. 2017, eq. 1).

    Grouped-query ``k``, ``v`` (fewer heads) are repeated to the query heads; with ``lengths`` each row is
    computed alone over its ``lengths[b]`` valid keys (the Attention contract's ragged rows)."""
    q, k, v = q.double(), k.double(), v.double()
    if k.size(1) != q.size(1):
        group = q.size(1) // k.size(1)
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    if lengths is not None:
        rows = [
            reference_attention(q[b : b + 1], k[b : b + 1, :, :n], v[b : b + 1, :, :n], causal=causal)
            for b, n in enumerate(lengths.tolist())
        ]
        return torch.cat(rows)
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
    if causal:
        t_q, t_k = q.size(-2), k.size(-2)
        visible = torch.ones(t_q, t_k, dtype=torch.bool, device=q.device).tril(diagonal=t_k - t_q)
        scores = scores.masked_fill(~visible, float("-inf"))
    return scores.softmax(-1) @ v


def check_attention(
    attention: Any, *, tolerance: float = 2e-4, dtype: torch.dtype = torch.float32, device: str = "cpu", **options: Any
) -> None:
    """Outputs and gradients match the reference — exact softmax attention, or the attention's own
    ``reference(q, k, v, *, causal)`` when it declares one — on random shapes, q shorter than k, causal
    and not; shapes and dtypes are preserved. ``tolerance`` is relative to the reference's scale.

    An attention that declares ``grouped_query = True`` is also given keys and values with fewer heads
    than the queries, and one that declares ``ragged = True`` per-row ``lengths`` (see
    :class:`~anexa_core.interfaces.Attention`); the model gives the others neither (it repeats the heads
    and runs ragged rows one at a time for them)."""
    # Why complex: the cases grow with what the attention declares (grouped query, ragged rows), and each is run
    # causal and not and compared on shape, dtype, output and each gradient, so a failure names its case.
    attend = _build(attention, options)
    own = getattr(attend, "reference", None)
    reference = own if callable(own) else reference_attention
    generator = torch.Generator().manual_seed(0)
    cases: list[tuple[int, int, int, int, int, int, list[int] | None]] = [
        (batch, heads, heads, t_q, t_k, dim, None) for batch, heads, t_q, t_k, dim in ATTENTION_SHAPES
    ]
    if getattr(attend, "grouped_query", False):
        cases += [(b, h, kv, tq, tk, d, None) for b, h, kv, tq, tk, d in GROUPED_QUERY_SHAPES]
    if getattr(attend, "ragged", False):
        kv_heads = 1 if getattr(attend, "grouped_query", False) else 2
        cases += [(len(n), 2, kv_heads, tq, max(n), d, n) for tq, d, n in RAGGED_SHAPES]
    for batch, heads, kv_heads, t_q, t_k, dim, row_lengths in cases:
        lengths = None if row_lengths is None else torch.tensor(row_lengths, device=device)
        extra = {} if lengths is None else {"lengths": lengths}
        for causal in (True, False):
            q = torch.randn(batch, heads, t_q, dim, generator=generator).to(device, dtype)
            k, v = (torch.randn(batch, kv_heads, t_k, dim, generator=generator).to(device, dtype) for _ in range(2))
            weight = torch.randn(batch, heads, t_q, dim, generator=generator).to(device, dtype)
            leaves = [t.clone().requires_grad_() for t in (q, k, v)]
            out = attend(*leaves, causal=causal, **extra)
            case = f"shape q {tuple(q.shape)} k {tuple(k.shape)}, lengths {row_lengths}, causal={causal}"
            assert out.shape == q.shape, f"{case}: output shape {tuple(out.shape)}, expected {tuple(q.shape)}"
            assert out.dtype == dtype, f"{case}: output dtype {out.dtype}, expected {dtype}"
            ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
            expected = reference(*ref_leaves, causal=causal, **extra).double()
            scale = expected.abs().max().item() + 1e-12
            error = (out.double() - expected).abs().max().item()
            assert error <= tolerance * max(scale, 1.0), f"{case}: max error {error:.2e} against the reference"
            grads = torch.autograd.grad((out * weight).sum(), leaves)
            ref_grads = torch.autograd.grad((expected * weight.double()).sum(), ref_leaves)
            for name, got, want in zip("qkv", grads, ref_grads, strict=True):
                err = (got.double() - want).abs().max().item()
                assert err <= tolerance * max(want.abs().max().item(), 1.0), f"{case}: d{name} error {err:.2e}"


def check_tokenizer(tokenizer: Any, text: str, **options: Any) -> None:
    """Trains on ``text`` (given as chunks), then: round trips, ids within the vocabulary, the state
    survives JSON, ``encode_batch`` (if any) equals ``encode``, the streaming rule holds (the streamer,
    which decodes only a short tail each time, reproduces the whole decode), and the bytes of the tokens
    of the text's start and of its end (``token_bytes``, or ``decode([id])`` encoded without it), joined,
    are its UTF-8 bytes — so a tokenizer whose tokens split characters must give ``token_bytes``."""
    from anexa_core.infer.generation import decode_stream, token_bytes

    trained = _build(tokenizer, options)
    lines = text.splitlines(keepends=True)
    trained.train(iter(lines))
    size = trained.vocab_size
    assert isinstance(size, int) and size > 0, f"vocab_size must be a positive int after training, got {size!r}"
    sample = text[:20_000]
    ids = trained.encode(sample)
    assert all(isinstance(i, int) and 0 <= i < size for i in ids), "encode gave ids outside the vocabulary"
    assert trained.decode(ids) == sample, "decode(encode(text)) is not the text"
    state = json.loads(json.dumps(trained.state_dict()))
    restored = _build(tokenizer, options)
    restored.load_state_dict(state)
    assert restored.vocab_size == size, "the restored tokenizer has another vocab_size"
    assert restored.encode(sample) == ids, "the restored tokenizer encodes differently"
    if hasattr(trained, "encode_batch"):
        pieces = lines[:50]
        batch = [[int(i) for i in ids] for ids in trained.encode_batch(pieces)]  # lists or numpy arrays
        assert batch == [trained.encode(piece) for piece in pieces], "encode_batch != encode"
    streamed = "".join(decode_stream(trained, iter(ids[:3000])))
    assert streamed == trained.decode(ids[:3000]), "streaming decode differs from decode: see the streaming rule"
    ending = text[-2000:]  # tests often end their text with rare characters
    for part in (sample, ending):
        token_pieces = [token_bytes(trained, i) for i in trained.encode(part)]
        assert b"".join(token_pieces) == part.encode("utf-8"), (
            "the bytes of its tokens, joined, are not the text's UTF-8 bytes: "
            + (
                "token_bytes is wrong"
                if hasattr(trained, "token_bytes")
                else "tokens that split a character need token_bytes(id)"
            )
        )


def _tiny_config(**changes: Any) -> ModelConfig:
    values: dict[str, Any] = dict(vocab_size=23, n_layer=2, n_head=2, n_embd=32, block_size=16)
    values.update(changes)
    return ModelConfig(**values)


class _ReferenceAttention:
    grouped_query = True
    ragged = True

    def __call__(self, q, k, v, *, causal, lengths=None):
        return reference_attention(q, k, v, causal=causal, lengths=lengths).to(q.dtype)


def check_blocks(blocks: Any, **options: Any) -> None:
    """Builds a tiny model with the family: shapes, every parameter gets a finite gradient, outputs do not
    depend on later tokens (causal), and decoding with a :class:`~anexa_core.KVCache` one token at a time
    gives the logits of recomputing the whole sequence, up to the full ``block_size``. A stack that
    declares ``batched = True`` must also decode rows at different positions in one batch (a ragged
    cache) exactly as each row alone."""
    family = _build(blocks, options)
    config = _tiny_config()
    torch.manual_seed(0)
    model = GPT(config, family.build(config, Attend(_ReferenceAttention()))).double().eval()
    ids = torch.randint(0, config.vocab_size, (2, config.block_size), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(config.block_size)
    hidden = model.blocks(model.wte(ids), positions, None)
    assert hidden.shape == (2, config.block_size, config.n_embd), f"stack output shape {tuple(hidden.shape)}"
    full, _ = model(ids)
    assert full.shape == (2, config.block_size, config.vocab_size)
    changed = ids.clone()
    changed[:, -1] = (changed[:, -1] + 1) % config.vocab_size
    assert torch.allclose(model(changed)[0][:, :-1], full[:, :-1]), "earlier positions see a later token"
    cache = KVCache(config.block_size)
    steps = [model(ids[:, :5], cache=cache)[0]]
    for i in range(5, config.block_size):
        steps.append(model(ids[:, i : i + 1], cache=cache)[0])
    cached = torch.cat(steps, dim=1)
    error = (cached - full).abs().max().item()
    assert error < 1e-9, f"cached decoding differs from recomputation by {error:.2e}"
    assert len(cache) == config.block_size, "the cache should hold every position after decoding them"
    if getattr(model.blocks, "batched", False):
        _check_ragged_rows(model, ids[0], full[0])
    model.train()
    _, loss = model(ids[:, :-1], ids[:, 1:])
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, f"parameter {name} gets no gradient"
        assert torch.isfinite(param.grad).all(), f"parameter {name} has a non-finite gradient"


def _check_ragged_rows(model: GPT, ids: torch.Tensor, full: torch.Tensor) -> None:
    """Three rows prefilled alone to 3, 7 and 11 positions join one ragged cache; decoding the next tokens
    of all three together gives each row's logits of recomputation."""
    lengths = [3, 7, 11]
    batch: KVCache | None = None
    for row, length in enumerate(lengths):
        alone = KVCache(model.config.block_size)
        model(ids[None, :length], cache=alone)
        if batch is None:
            batch = KVCache.batch_like(alone, len(lengths))
        batch.copy_row(row, alone)
    assert batch is not None
    for step in range(4):
        tokens = torch.stack([ids[length + step] for length in lengths])[:, None]
        logits, _ = model(tokens, cache=batch)
        for row, length in enumerate(lengths):
            error = (logits[row, -1] - full[length + step]).abs().max().item()
            assert error < 1e-9, f"a ragged row at position {length + step} differs from recomputation by {error:.2e}"


def check_sampler(sampler: Any, **options: Any) -> None:
    """A logits processor: an int ``order``; same shape; at least one finite logit per row, never NaN or
    ``+inf``, even for extreme logits; the input is not modified; rows are processed independently (each
    row's logits as it alone would get them: the batched engine processes the rows of many requests at
    once); with ``reads_context = False``, the context changes nothing."""
    processor = _build(sampler, options)
    assert isinstance(getattr(processor, "order", None), int), "a sampler needs an int class attribute `order`"
    fields = {option.name for option in plugin_options.describe(sampler)}
    assert "order" not in fields, "`order` is an option here (users could move the sampler): make it a ClassVar"
    generator = torch.Generator().manual_seed(0)
    cases = [
        torch.randn(3, 17, generator=generator),
        torch.randn(3, 17, generator=generator) * 1e4,
        torch.full((2, 9), 3.0),
        torch.tensor([[0.0, float("-inf"), 2.0, float("-inf")]]),
        torch.tensor([[-3e38, 3e38, 0.0]]),
    ]
    for logits in cases:
        for context in (
            torch.zeros(logits.size(0), 0, dtype=torch.long),
            torch.randint(0, logits.size(1), (logits.size(0), 6), generator=generator),
        ):
            before = logits.clone()
            out = processor(logits, context)
            assert torch.equal(logits, before), "the sampler modified its input in place"
            assert out.shape == logits.shape, f"output shape {tuple(out.shape)} for input {tuple(logits.shape)}"
            assert not torch.isnan(out).any(), f"NaN for logits {logits.tolist()}"
            assert not (out == float("inf")).any(), f"+inf for logits {logits.tolist()}"
            assert torch.isfinite(out).any(-1).all(), f"a row lost every token for logits {logits.tolist()}"
            rows = torch.cat([processor(logits[i : i + 1], context[i : i + 1]) for i in range(logits.size(0))])
            assert torch.equal(rows, out), "rows are not processed independently (alone, a row gets other logits)"
            if not getattr(processor, "reads_context", True):
                assert torch.equal(processor(logits, context[:, :0]), out), "reads_context = False, yet it does"


def check_optimizer(optimizer: Any, **options: Any) -> None:
    """Builds over a tiny model (an optimizer or a list of them); every parameter is optimized exactly
    once; a few steps on one batch lower the loss; the state round-trips through ``state_dict``."""
    from anexa_core import plugins

    factory = _build(optimizer, options)
    config = _tiny_config()
    torch.manual_seed(0)
    blocks, _ = plugins.create("blocks", config.blocks)
    model = GPT(config, blocks.build(config, Attend(_ReferenceAttention())))
    train = TrainConfig(lr=3e-3, warmup_steps=0)
    from anexa_core.train.optim import combine

    returned = factory.build(model, train)
    listed = returned if isinstance(returned, (list, tuple)) else [returned]
    assert listed and all(isinstance(o, torch.optim.Optimizer) for o in listed), (
        "build() must return a torch.optim.Optimizer or a list of them"
    )
    owned = [id(p) for o in listed for group in o.param_groups for p in group["params"]]
    assert len(owned) == len(set(owned)), "a parameter is given to two optimizers or groups"
    assert set(owned) == {id(p) for p in model.parameters()}, "every parameter must be optimized, once"
    built = combine(returned)
    ids = torch.randint(0, config.vocab_size, (4, config.block_size + 1), generator=torch.Generator().manual_seed(2))
    losses = []
    for _ in range(8):
        _, loss = model(ids[:, :-1], ids[:, 1:])
        built.zero_grad(set_to_none=True)
        loss.backward()
        built.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], f"8 steps did not lower the loss: {losses[0]:.4f} → {losses[-1]:.4f}"
    again = combine(factory.build(model, train))
    again.load_state_dict(built.state_dict())


def check_dataset(dataset: Any, **options: Any) -> None:
    """``files()`` returns existing files whose text reads as UTF-8, and ``description`` is a string."""
    from anexa_core.data.corpus import read_corpus

    corpus = _build(dataset, options)
    assert isinstance(getattr(corpus, "description", None), str), "a dataset needs a `description` string"
    files = corpus.files()
    assert files, "files() returned nothing"
    for path in files:
        assert read_corpus(path).strip(), f"{path} holds no text"


CHECKS: dict[str, Callable[..., None]] = {
    "attention": check_attention,
    "blocks": check_blocks,
    "samplers": check_sampler,
    "optimizers": check_optimizer,
    "datasets": check_dataset,
}
"""The checks by plugin kind (tokenizers need a text: :func:`check_tokenizer`)."""
