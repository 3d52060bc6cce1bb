"""The assembled GPT: attention backends agree, the KV cache equals recomputation, checkpoints round-trip."""

import json
import math
import os
import stat

import pytest
import torch
from helpers import TINY, Greedy, attention, loaded_tokenizer, tiny_model

from anexa_core.errors import AnexaError
from anexa_core.infer.generation import generate_ids
from anexa_core.io import checkpoint
from anexa_core.model.cache import KVCache


@pytest.mark.parametrize("t_q,t_k", [(7, 7), (1, 9), (3, 9), (16, 16)])
@pytest.mark.parametrize("causal", [True, False])
def test_sdpa_matches_math_reference(t_q, t_k, causal):
    math_attention = attention("math")
    sdpa = attention("sdpa")
    q = torch.randn(2, 3, t_q, 8, dtype=torch.float64)
    k, v = torch.randn(2, 3, t_k, 8, dtype=torch.float64), torch.randn(2, 3, t_k, 8, dtype=torch.float64)
    torch.testing.assert_close(sdpa(q, k, v, causal=causal), math_attention(q, k, v, causal=causal))


def test_math_attention_is_causal_bottom_right():
    """The last of three queries over five keys sees every key; the first sees keys 0..2 only."""
    math_attention = attention("math")
    q = torch.zeros(1, 1, 3, 4)
    k = torch.zeros(1, 1, 5, 4)
    v = torch.arange(5.0).view(1, 1, 5, 1).expand(1, 1, 5, 4)
    out = math_attention(q, k, v, causal=True)[0, 0, :, 0]
    torch.testing.assert_close(out, torch.tensor([1.0, 1.5, 2.0]))


def test_parameter_count_of_seed_preset():
    from anexa_core.config import resolve
    from anexa_core.model.gpt import build_model

    model_config, _ = resolve("seed")
    model = build_model(__import__("dataclasses").replace(model_config, vocab_size=65))
    assert 0.78e6 < model.num_parameters() < 0.85e6
    assert model.lm_head.weight is model.wte.weight


def test_kv_cache_logits_equal_full_recomputation():
    model = tiny_model()
    ids = torch.randint(0, TINY.vocab_size, (2, 12))
    full, _ = model(ids)
    cache = KVCache(TINY.block_size)
    first, _ = model(ids[:, :5], cache=cache)
    steps = [first] + [model(ids[:, i : i + 1], cache=cache)[0] for i in range(5, 12)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def _reference_generate(model, prompt, n):
    """nanoGPT's loop: recompute the last block_size tokens for every new token, pick argmax."""
    ids = torch.tensor([prompt])
    out = []
    for _ in range(n):
        logits, _ = model(ids[:, -TINY.block_size :])
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], 1)
        out.append(int(nxt))
    return out


def test_cached_generation_matches_reference_step_by_step_past_the_context():
    """The ``sliding`` policy is nanoGPT's generate exactly, also long after the window has filled."""
    model = tiny_model(seed=3)
    prompt = torch.randint(0, TINY.vocab_size, (20,)).tolist()  # longer than the context: cropped left
    produced = list(generate_ids(model, prompt, 40, Greedy(), context="sliding"))
    assert produced == _reference_generate(model, prompt[-TINY.block_size :], 40)
    assert produced == list(generate_ids(model, prompt, 40, Greedy(), use_cache=False))


def test_shift_policy_equals_the_reference_until_the_window_fills_then_restarts_from_half():
    model = tiny_model(seed=4)
    prompt = torch.randint(0, TINY.vocab_size, (10,)).tolist()
    shifted = list(generate_ids(model, prompt, 30, Greedy(), context="shift"))
    reference = _reference_generate(model, prompt, 30)
    room = TINY.block_size - len(prompt)  # tokens predicted before the window is full: 6, plus the first
    assert shifted[: room + 1] == reference[: room + 1]
    # Then the window keeps its most recent half: the next token is predicted from those 8 tokens alone.
    history = prompt + shifted
    at = len(prompt) + room + 1
    window = torch.tensor([history[at - TINY.block_size // 2 : at]])
    assert shifted[room + 1] == int(model(window)[0][0, -1].argmax())


def test_empty_prompt_is_a_user_error():
    with pytest.raises(AnexaError, match="prompt is empty"):
        list(generate_ids(tiny_model(), [], 3, Greedy()))


CHARS = {"type": "char", "chars": "".join(chr(97 + i) for i in range(TINY.vocab_size))}


def _save_tiny(tmp_path, model):
    tokenizer = loaded_tokenizer("char", CHARS)
    path = tmp_path / "model.safetensors"
    checkpoint.save_model(path, model, checkpoint.model_metadata(model, tokenizer, "char", {}, step=7, val_loss=1.5))
    return path


def test_save_then_load_gives_identical_logits(tmp_path):
    model = tiny_model(seed=1)
    path = _save_tiny(tmp_path, model)
    loaded, tokenizer, meta = checkpoint.load_model(tmp_path)
    ids = torch.randint(0, TINY.vocab_size, (2, 16))
    assert torch.equal(loaded(ids)[0], model(ids)[0])
    assert loaded.lm_head.weight is loaded.wte.weight
    assert meta["step"] == 7 and meta["model_config"]["n_layer"] == 2
    assert meta["plugins"]["blocks"] == {
        "name": "gpt2",
        "options": {"bias": True, "gelu": "exact"},
        "distribution": "anexa",
        "version": meta["anexa_version"],
    }
    assert tokenizer.vocab_size == TINY.vocab_size
    assert path.read_bytes()[:8] != b"\x80\x02\x8a\x0al\xfc\x9c"  # safetensors, not a pickle
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    assert "anexa" in json.loads(path.read_bytes()[8 : 8 + header_len])["__metadata__"]


def test_load_with_other_attention_backend_gives_same_logits(tmp_path):
    model = tiny_model(seed=2)
    _save_tiny(tmp_path, model)
    loaded, _, _ = checkpoint.load_model(tmp_path, attention="math")
    ids = torch.randint(0, TINY.vocab_size, (1, 16))
    torch.testing.assert_close(loaded(ids)[0], model(ids)[0], rtol=1e-5, atol=1e-5)


def test_load_stores_wide_cpu_weights_column_major_with_the_same_values(tmp_path):
    """`load` re-stores every weight with more outputs than inputs column-major (the GEMV of batch-1
    decoding streams it faster on a CPU): here the SwiGLU gate/up and the tied head, once for the token
    embedding too; square (q, o) and narrow (k, v of grouped-query attention, down) weights keep their
    order. Values, logits and a checkpoint written from the loaded model stay those of the saved one."""
    from anexa_core.io.load import load

    model = tiny_model(seed=3, blocks="llama", blocks_options=dict(mlp="swiglu", n_kv_head=1))
    _save_tiny(tmp_path, model)
    loaded = load(tmp_path, "cpu").model
    layouts = {  # (projection, order) of every layer's projections
        (name.rsplit(".", 1)[-1], "rows" if module.weight.is_contiguous() else "columns")
        for name, module in loaded.blocks.named_modules()
        if isinstance(module, torch.nn.Linear)
    }
    assert layouts == {
        ("q_proj", "rows"), ("k_proj", "rows"), ("v_proj", "rows"), ("o_proj", "rows"),
        ("gate_proj", "columns"), ("up_proj", "columns"), ("down_proj", "rows"),
    }  # fmt: skip
    linears = [module for module in loaded.modules() if isinstance(module, torch.nn.Linear)]
    assert all(module.weight.is_contiguous() or module.weight.t().is_contiguous() for module in linears)
    assert loaded.lm_head.weight is loaded.wte.weight and loaded.wte.weight.t().is_contiguous()
    stored = load(tmp_path, "cpu", decoding=False).model  # export's: the weights in their stored order
    assert all(parameter.is_contiguous() for parameter in stored.parameters())
    saved = model.state_dict()
    assert all(torch.equal(tensor, saved[name]) for name, tensor in loaded.state_dict().items())
    ids = torch.randint(0, TINY.vocab_size, (2, 16))
    torch.testing.assert_close(loaded(ids)[0], model(ids)[0], rtol=1e-5, atol=1e-6)
    again = tmp_path / "again"
    again.mkdir()
    checkpoint.save_model(again / "model.safetensors", loaded, checkpoint.read_metadata(tmp_path / "model.safetensors"))
    assert all(
        torch.equal(tensor, saved[name]) for name, tensor in checkpoint.load_model(again)[0].state_dict().items()
    )


@pytest.mark.parametrize("tie", [True, False])
def test_checkpoint_file_is_what_safetensors_save_model_writes(tmp_path, tie):
    """Anexa writes its own unique-name state (safetensors' `save_model` cannot write a column-major tied
    head); the files stay those `save_model` wrote before: the same header (names, offsets, metadata with
    the tied head's alias; compared as JSON, since safetensors orders metadata keys by a hash map) and
    the same data, byte for byte."""
    import safetensors.torch

    def parts(path):
        raw = path.read_bytes()
        size = int.from_bytes(raw[:8], "little")
        return json.loads(raw[8 : 8 + size]), raw[8 + size :]

    model = tiny_model(seed=5, tie_embeddings=tie)
    path = _save_tiny(tmp_path, model)
    meta = checkpoint.read_metadata(path)
    safetensors.torch.save_model(model, str(tmp_path / "reference.safetensors"), metadata={"anexa": json.dumps(meta)})
    assert parts(path) == parts(tmp_path / "reference.safetensors")
    assert ("wte.weight" in parts(path)[0]["__metadata__"]) == tie


@pytest.mark.parametrize("where", ["float64", "meta"])
def test_decoding_layout_leaves_other_dtypes_and_devices_alone(where):
    """Measured for float32 on a CPU only: float64 (and bf16) or non-CPU weights keep their order."""
    from anexa_core.model.gpt import decoding_layout

    model = tiny_model(seed=4).to(torch.float64 if where == "float64" else torch.device("meta"))
    decoding_layout(model)
    assert all(parameter.is_contiguous() for parameter in model.parameters())


@pytest.mark.parametrize(
    "damage",
    [
        lambda b: b[: len(b) // 2],  # truncated
        lambda b: b"\xff" * 8 + b[8:],  # absurd header length
        lambda b: b"",  # empty
        lambda b: b[:8] + b"{not json" + b[17:],  # garbled header
    ],
)
def test_corrupt_checkpoint_is_a_one_line_user_error(tmp_path, damage):
    path = _save_tiny(tmp_path, tiny_model())
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(AnexaError, match=r"corrupt|not an Anexa checkpoint") as caught:
        checkpoint.load_model(path)
    assert "\n" not in str(caught.value)


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    """A crash while writing leaves the previous checkpoint intact and no temp files behind."""
    model = tiny_model()
    path = _save_tiny(tmp_path, model)
    before = path.read_bytes()
    import safetensors.torch

    def explode(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", explode)
    with pytest.raises(OSError):
        checkpoint.save_model(path, model, checkpoint.read_metadata(path))
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_an_atomic_write_to_a_folder_or_under_a_file_is_one_line_and_writes_nothing(tmp_path):
    """`anexa bench --json /tmp` took minutes of measuring, then a traceback (and a temp file in /)."""
    from anexa_core.io.files import atomic_path

    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("mine")
    cases = {
        tmp_path / "folder": f"{tmp_path / 'folder'} is a folder: pass the path of a file to write",
        tmp_path / "file" / "x.json": f"{tmp_path / 'file'} is a file, so {tmp_path / 'file' / 'x.json'} cannot be "
        "written: pass another path",
    }
    for target, message in cases.items():
        with pytest.raises(AnexaError) as error, atomic_path(target) as tmp:
            tmp.write_text("{}")
        assert str(error.value) == message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "folder"] and not any((tmp_path / "folder").iterdir())
    assert (tmp_path / "file").read_text() == "mine"
    # A near miss: a file in folders that do not exist yet is written, folders and all.
    with atomic_path(tmp_path / "folder" / "new" / "x.json") as tmp:
        tmp.write_text("{}")
    assert (tmp_path / "folder" / "new" / "x.json").read_text() == "{}"


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_atomic_writes_give_ordinary_permissions(tmp_path, umask):
    """A checkpoint (atomic_path) and an export folder (atomic_folder) get the modes a plain ``open()`` /
    ``mkdir`` would give under the umask, not the temp file's private 0600 / 0700."""
    from anexa_core.io.files import atomic_folder

    old = os.umask(umask)
    try:
        path = _save_tiny(tmp_path, tiny_model())
        with atomic_folder(tmp_path / "export") as folder:
            (folder / "config.json").write_text("{}")
        plain = tmp_path / "plain"
        plain.write_text("")
        (tmp_path / "plain-folder").mkdir()
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(path) == mode(tmp_path / "export" / "config.json") == mode(plain) == 0o666 & ~umask
    assert mode(tmp_path / "export") == mode(tmp_path / "plain-folder") == 0o777 & ~umask


# --- initialisation -------------------------------------------------------------------------------

INIT = dict(vocab_size=96, n_layer=4, n_head=4, n_embd=128, block_size=64)
RESIDUAL_STD = 0.02 / math.sqrt(2 * INIT["n_layer"])  # GPT-2's scaled-down residual projections: 0.00707


def _init_families(model, families):
    """Each parameter's family by the first pattern its name ends with; every parameter must have one."""
    found = {}
    for name, param in model.named_parameters():
        family = next((family for family, endings in families.items() if name.endswith(endings)), None)
        assert family is not None, f"{name} belongs to no initialisation family: add it to the test"
        found.setdefault(family, []).append((name, param.detach()))
    assert found.keys() == families.keys(), f"families without parameters: {families.keys() - found.keys()}"
    return found


def _assert_init(found, expected):
    """``expected``: family → ("normal", std) | ("const", value). Normal weights: the sample std within 5%
    (the smallest matrix has 8192 elements: a standard error under 1%), mean near 0."""
    for family, params in found.items():
        kind, value = expected[family]
        for name, tensor in params:
            if kind == "const":
                assert torch.equal(tensor, torch.full_like(tensor, value)), f"{name} should start at {value}"
                continue
            std, mean = tensor.std().item(), tensor.mean().item()
            assert std == pytest.approx(value, rel=0.05), f"{name}: std {std:.5f}, expected {value:.5f}"
            assert abs(mean) < 0.05 * value, f"{name}: mean {mean:.2e} of a zero-mean init"


@pytest.mark.parametrize("tie", [True, False])
def test_gpt2_initialisation_of_every_parameter_family(tie):
    from anexa_core.config import ModelConfig
    from anexa_core.model.gpt import build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(**INIT, tie_embeddings=tie))
    families = {
        "token embedding": ("wte.weight",),
        "head": ("lm_head.weight",),
        "positions": ("wpe.weight",),
        "residual projections": ("attn.proj.weight", "mlp.proj.weight"),
        "other matrices": ("qkv.weight", "fc.weight"),
        "biases": ("qkv.bias", "proj.bias", "fc.bias"),
        "norm gains": ("ln_1.weight", "ln_2.weight", "ln_f.weight"),
        "norm biases": ("ln_1.bias", "ln_2.bias", "ln_f.bias"),
    }
    if tie:
        del families["head"]  # the head is the embedding (named once)
        assert model.lm_head.weight is model.wte.weight
    found = _init_families(model, families)
    assert len(found["residual projections"]) == 2 * INIT["n_layer"]
    _assert_init(
        found,
        {
            "token embedding": ("normal", 0.02),
            "head": ("normal", 0.02),
            "positions": ("normal", 0.02),
            "residual projections": ("normal", RESIDUAL_STD),
            "other matrices": ("normal", 0.02),
            "biases": ("const", 0.0),
            "norm gains": ("const", 1.0),
            "norm biases": ("const", 0.0),
        },
    )


@pytest.mark.parametrize("options", [{}, {"zero_init": True, "mlp": "relu2", "qk_norm": True, "n_kv_head": 2}])
def test_llama_initialisation_of_every_parameter_family(options):
    from anexa_core.config import ModelConfig
    from anexa_core.model.gpt import build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(**INIT, blocks="llama", blocks_options=options, tie_embeddings=False))
    families = {
        "token embedding": ("wte.weight",),
        "head": ("lm_head.weight",),
        "residual projections": ("o_proj.weight", "down_proj.weight"),
        "other matrices": ("q_proj.weight", "k_proj.weight", "v_proj.weight", "gate_proj.weight", "up_proj.weight"),
        "norm gains": ("layernorm.weight", "norm.weight"),  # input_, post_attention_, q_, k_ and the final norm
    }
    found = _init_families(model, families)
    assert len(found["residual projections"]) == 2 * INIT["n_layer"]
    residual = ("const", 0.0) if options.get("zero_init") else ("normal", RESIDUAL_STD)
    _assert_init(
        found,
        {
            "token embedding": ("normal", 0.02),
            "head": ("normal", 0.02),
            "residual projections": residual,
            "other matrices": ("normal", 0.02),
            "norm gains": ("const", 1.0),
        },
    )


@pytest.mark.parametrize("bf16", [False, True])
def test_chunked_loss_equals_cross_entropy_of_the_whole_batch_with_its_gradients(monkeypatch, bf16):
    """The loss in chunks of rows (ragged last chunk, ignored targets, a tied head) is the mean
    cross-entropy of all the logits at once, and so are the gradients of every parameter and the input."""
    import torch.nn.functional as F

    from anexa_core.model import gpt

    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(37, 16, requires_grad=True)
    targets = torch.randint(50, (37,))
    targets[[0, 5, 6, 36]] = -100
    dtype = torch.bfloat16 if bf16 else torch.float32
    with torch.autocast("cpu", dtype=dtype, enabled=bf16):
        expected = F.cross_entropy(head(hidden).float(), targets)
    expected_grads = torch.autograd.grad(expected, (hidden, head.weight))
    monkeypatch.setattr(gpt, "LOSS_CHUNK_ELEMENTS", 8 * 50)  # chunks of 8 rows: 5 chunks, the last of 5
    with torch.autocast("cpu", dtype=dtype, enabled=bf16):
        loss = gpt.head_loss(hidden, head, targets)
    grads = torch.autograd.grad(loss * 0.25, (hidden, head.weight))  # scaled as gradient accumulation does
    assert loss.dtype == torch.float32
    tolerance = dict(rtol=1e-2, atol=1e-3) if bf16 else dict(rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(loss, expected, **tolerance)
    for grad, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, want * 0.25, **tolerance)
    head.weight.requires_grad_(False)  # a frozen (LoRA's) head: the gradient of the input only
    with torch.autocast("cpu", dtype=dtype, enabled=bf16):
        frozen = gpt.head_loss(hidden, head, targets)
    assert frozen.grad_fn.saved_tensors[1] is None  # no (vocab, C) gradient computed for a frozen head
    (grad,) = torch.autograd.grad(frozen, (hidden,))
    torch.testing.assert_close(grad, expected_grads[0], **tolerance)
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=bf16):  # evaluation: no gradients at all
        torch.testing.assert_close(gpt.head_loss(hidden, head, targets), expected, **tolerance)
    all_ignored = torch.full_like(targets, -100)
    assert gpt.head_loss(hidden, head, all_ignored).isnan() and F.cross_entropy(head(hidden), all_ignored).isnan()


def test_the_loss_is_one_piece_exactly_when_it_fits_one_chunk_or_the_head_is_not_plain(monkeypatch):
    """The whole batch's logits are computed at once (the head called, a float32 loss even under bf16
    autocast) when they fit one chunk — to the element — or when the head has a bias (or is not an
    ``nn.Linear``); one row more and a plain head goes chunk by chunk, never called whole."""
    import torch.nn.functional as F

    from anexa_core.model import gpt

    torch.manual_seed(0)
    hidden, targets = torch.randn(6, 16), torch.randint(50, (6,))
    calls: list[int] = []
    for bias in (False, True):
        head = torch.nn.Linear(16, 50, bias=bias)
        head.register_forward_hook(lambda *_: calls.append(1))
        expected = F.cross_entropy(head(hidden), targets)
        for chunk_elements, one_piece in ((6 * 50, True), (6 * 50 - 1, bias)):
            monkeypatch.setattr(gpt, "LOSS_CHUNK_ELEMENTS", chunk_elements)
            calls.clear()
            torch.testing.assert_close(gpt.head_loss(hidden, head, targets), expected, rtol=1e-6, atol=1e-6)
            assert bool(calls) == one_piece, (bias, chunk_elements)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert gpt.head_loss(hidden, head, targets).dtype == torch.float32


def test_the_chunked_loss_computes_only_the_gradients_wanted(monkeypatch):
    """Without gradients (evaluation) the chunks compute none; with a frozen input only the head's (in its
    own dtype: bf16 weights get a bf16 gradient), with a frozen head only the input's."""
    import torch.nn.functional as F

    from anexa_core.model import gpt

    monkeypatch.setattr(gpt, "LOSS_CHUNK_ELEMENTS", 2 * 50)
    wanted = []
    chunked = gpt._chunked_head_loss
    monkeypatch.setattr(gpt, "_chunked_head_loss", lambda *a: wanted.append(a[4:]) or chunked(*a))
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden, targets = torch.randn(7, 16, requires_grad=True), torch.randint(50, (7,))
    with torch.no_grad():
        gpt.head_loss(hidden, head, targets)
    assert wanted == [(False, False)]
    for dtype in (torch.float32, torch.bfloat16):
        head_in_dtype = torch.nn.Linear(16, 50, bias=False).to(dtype)
        frozen_input = hidden.detach().to(dtype)
        loss = gpt.head_loss(frozen_input, head_in_dtype, targets)
        assert loss.grad_fn.saved_tensors[0] is None  # no gradient of an input that does not want one
        (grad,) = torch.autograd.grad(loss, (head_in_dtype.weight,))
        expected = F.cross_entropy(head_in_dtype(frozen_input).float(), targets)
        (want,) = torch.autograd.grad(expected, (head_in_dtype.weight,))
        assert grad.dtype == dtype
        torch.testing.assert_close(grad, want, **(dict(rtol=1e-2, atol=1e-3) if dtype == torch.bfloat16 else {}))
    assert wanted[1:] == [(False, True), (False, True)]


def test_a_model_with_targets_returns_its_loss_in_chunks_not_its_logits(monkeypatch):
    import torch.nn.functional as F

    from anexa_core.model import gpt

    model = tiny_model()
    ids, targets = torch.randint(TINY.vocab_size, (2, 3, 12)).unbind()
    targets[0, :4] = -100
    expected = F.cross_entropy(model(ids)[0].flatten(0, 1), targets.flatten())
    monkeypatch.setattr(gpt, "LOSS_CHUNK_ELEMENTS", 5 * TINY.vocab_size)
    calls = []
    model.lm_head.register_forward_hook(lambda *_: calls.append(1))
    logits, loss = model(ids, targets)
    assert logits is None and not calls  # the plain head's weight is used chunk by chunk, never the whole head
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)


def test_a_cache_grows_by_doubling_from_its_first_allocation():
    """Buffers start at the first tokens' length (at least 64 positions) and double from there, capped at the
    context: the growth the engine's KV-cache budget counts on (`cache.grown_capacity`)."""
    cache = KVCache(1000)
    keys = torch.zeros(1, 2, 100, 4)
    cache.update(0, keys, keys)
    assert cache.capacity == 100
    cache.reserve(101)
    assert cache.capacity == 200  # doubled from 100, not from 64 or from anything else
    cache.reserve(900)
    assert cache.capacity == 1000  # 800 doubled, capped at the context
    small = KVCache(1000)
    small.update(0, keys[:, :, :3], keys[:, :, :3])
    assert small.capacity == 64


def test_a_narrowed_view_advances_its_parents_rows_and_a_plain_cache_reports_its_rows():
    """The engine feeds a narrowed view of its ragged batch: what the view stores, and how far its rows
    advance, is the parent's. A plain cache (rows advancing together) says every row holds its length, and
    cannot be narrowed (its rows' progress could not be shared)."""
    plain = KVCache(100)
    keys = torch.arange(2 * 3 * 5 * 4, dtype=torch.float32).reshape(2, 3, 5, 4)
    for layer in range(2):
        plain.update(layer, keys, keys)
    assert plain.row_lengths() == [5, 5] and plain.row_length(1) == 5
    with pytest.raises(AssertionError, match="narrow needs a ragged cache"):
        plain.narrow(1)
    batch = KVCache.batch_like(plain, 3)
    assert batch.row_lengths() == [0, 0, 0] and len(batch) == 0
    batch.copy_row(0, plain, 1)
    batch.copy_row(1, plain, 0)
    view = batch.narrow(2)
    new = torch.ones(2, 3, 1, 4)
    for layer in range(2):
        stored, _ = view.update(layer, new, new)
        assert torch.equal(stored[0, :, :5], keys[1]) and torch.equal(stored[:, :, 5], new[:, :, 0])
    assert batch.row_lengths() == [6, 6, 0] and view.row_lengths() == [6, 6] and len(batch) == 6
    assert torch.equal(batch._keys[1][1, :, :6], torch.cat([keys[0], new[0]], dim=1))
    # Several tokens at once land after each row's own last one, numbered from there.
    batch.free_row(0)
    assert batch.row_lengths() == [0, 6, 0]
    assert batch.positions(3, torch.device("cpu")).tolist() == [[0, 1, 2], [6, 7, 8], [0, 1, 2]]
    three = torch.randn(3, 3, 3, 4)
    for layer in range(2):
        stored, _ = batch.update(layer, three, three)
        assert stored.shape == (3, 3, 9, 4) and batch.lengths(layer).tolist() == [3, 9, 3]
        assert torch.equal(stored[0, :, :3], three[0]) and torch.equal(stored[1, :, 6:9], three[1])
    assert len(batch._keys) == len(plain._keys) == 2  # one buffer pair per layer, however many updates
    with pytest.raises(ValueError, match=r"^KV cache holds 100 positions; 101 requested$"):
        plain.update(0, torch.zeros(2, 3, 96, 4), torch.zeros(2, 3, 96, 4))
    with pytest.raises(ValueError, match=r"^KV cache holds 100 positions; 101 requested$"):
        batch.update(0, torch.zeros(3, 3, 92, 4), torch.zeros(3, 3, 92, 4))
    with pytest.raises(ValueError, match=r"^KV cache layers must be used in order 0, 1, …: got layer 3 first$"):
        plain.update(3, keys, keys)
