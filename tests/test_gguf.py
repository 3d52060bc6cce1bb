"""GGUF files to and from transformers' representation (:mod:`anexa_core.io.gguf`), checked against
transformers' own GGUF loading.

The SmolLM2-135M-Instruct fixture (Llama, Q4_1 with a Q8_0 embedding) is read once per module, and
transformers loads it once: the logits of a ``LlamaForCausalLM`` built from what :func:`read_gguf` returns
agree with transformers' load within 1e-4, and the tokenizer gives transformers' ids. The file written back
(f32) loads in transformers with the same logits and ids. Tiny Qwen3 (QK-norm), Llama (biases, untied head)
and GPT-2 models go through :func:`write_gguf` and back through transformers and :func:`read_gguf`. Every
error is one line, and a failed write leaves nothing behind. No network.
"""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import gguf_folder, strict, transformers_model, transformers_tokenizer

from anexa_core.errors import AnexaError

try:
    import gguf
    import transformers
except ImportError:  # pragma: no cover - the dev extra installs both
    if strict():
        raise
    pytest.skip(
        "gguf or transformers is not installed: .venv/bin/pip install gguf transformers", allow_module_level=True
    )

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from anexa_core.io import gguf as anexa_gguf
from anexa_core.io.gguf import GGUFModel, read_gguf, write_gguf
from anexa_plugins.hf_tokenizer import PretrainedTokenizer

TOLERANCE = 1e-4
FIX = "download the file again or convert the model to GGUF again"
TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "It's a test: they'll see we're here, I'm sure. DON'T SHOUT, I'LL LISTEN.",
    "Punctuation!!! ??? ... --- (a)[b]{c} <tag/> @#$%^&* ~`|\\ \"quoted\" 'single'",
    "  leading spaces\tand\ttabs\n\n\nthree newlines   trailing runs   ",
    "\r\nwindows\r\nlines\r\n\r\n",
    "Unicode: naïve café, Straße, 中文字符, русский текст, Ελληνικά, emoji 🤖👍🏽, combining é",
    "<|im_start|>system\nYou are a helpful AI assistant.<|im_end|>\n<|im_start|>user\nHi there!<|im_end|>\n"
    "<|im_start|>assistant\n",
    "<|endoftext|><repo_name>anexa<file_sep>x",
    "Hello world! 123 and 4567890, a 1 b 22 c 333; 3.14159",
    "",
]
"""Texts on which transformers' tokenizer for the fixture is the model's own (digits that follow a run of
whitespace are the exception, see :func:`test_digits_are_split_one_by_one_as_smollm_pre_means`)."""


# ---------------------------------------------------------------------------------------------------------
# Fixtures: the real model (read once, loaded by transformers once) and tiny models.


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf) -> GGUFModel:
    return read_gguf(smollm2_gguf)


@pytest.fixture(scope="module")
def reference_tokenizer(smollm2_transformers):
    return smollm2_transformers[1]


@pytest.fixture(scope="module")
def prompt(reference_tokenizer, sherlock_path) -> torch.Tensor:
    """A few hundred tokens of real prose in a ChatML turn."""
    prose = sherlock_path.read_text(encoding="utf-8")[5000:6000]
    text = f"<|im_start|>user\n{prose}<|im_end|>\n<|im_start|>assistant\n"
    ids = reference_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert 200 <= len(ids) <= 400
    return torch.tensor([ids])


@pytest.fixture(scope="module")
def reference_logits(smollm2_transformers, prompt) -> torch.Tensor:
    with torch.no_grad():
        return smollm2_transformers[0](prompt).logits


@pytest.fixture(scope="module")
def written_smollm2(smollm2, tmp_path_factory):
    """The fixture read, then written back as f32 (540 MB, removed after the module)."""
    path = tmp_path_factory.mktemp("written") / "smollm2-f32.gguf"
    write_gguf(path, smollm2.hf_config, smollm2.tensors, smollm2.tokenizer, name="SmolLM2 135M Instruct")
    yield path
    path.unlink()


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


CORPUS = [
    "The quick brown fox jumps over the lazy dog. 12345 apples, 678 pears!",
    "Hello world, hello tokenizer; it's tiny. Naïve café 中文.",
    "<|im_start|>user\nhi<|im_end|>\n",
] * 10


def _tiny_tokenizer(pre_tokenizer, specials: list[str], template: str | None, eos: str) -> dict:
    """A byte-level BPE of 300 tokens trained on a few lines, as the ``hf`` plugin's state."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=alphabet, show_progress=False
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    return {
        "type": "hf",
        "tokenizer": tokenizer.to_str(),
        "special_tokens": {"bos_token": None, "eos_token": eos, "unk_token": None, "pad_token": specials[0]},
        "eos_tokens": [],
        "add_bos": False,
        "chat_template": template,
    }


QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
CHATML = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"


@pytest.fixture(scope="module")
def qwen_tokenizer() -> dict:
    pre = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    state = _tiny_tokenizer(pre, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], CHATML, "<|endoftext|>")
    return state | {"eos_tokens": ["<|im_end|>"]}


@pytest.fixture(scope="module")
def gpt2_tokenizer() -> dict:
    pre = pre_tokenizers.ByteLevel(add_prefix_space=False)
    return _tiny_tokenizer(pre, ["<|endoftext|>"], None, "<|endoftext|>")


def _randomized(model: torch.nn.Module) -> torch.nn.Module:
    """Weights far from their initial values (norms included), so that a mix-up shows in the logits."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2 + 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def tiny_qwen3(qwen_tokenizer):
    # head_dim 128 is not hidden_size / heads (16): the file must state it. 128 because transformers 5.25
    # ignores `qwen3.attention.key_length` in a GGUF file and builds Qwen3Config's default head_dim, 128.
    config = transformers.Qwen3Config(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=128,
        max_position_embeddings=64,
        rope_theta=50000.0,
        tie_word_embeddings=False,
    )
    return _randomized(transformers.Qwen3ForCausalLM(config))


@pytest.fixture(scope="module")
def tiny_gpt2():
    # n_positions 1024: transformers 5.25 reads a GGUF GPT-2's context_length into n_ctx, not n_positions,
    # so it builds the default 1024 position embeddings whatever the file says.
    config = transformers.GPT2Config(vocab_size=300, n_embd=32, n_layer=2, n_head=2, n_positions=1024)
    return _randomized(transformers.GPT2LMHeadModel(config))


@pytest.fixture(scope="module")
def tiny_llama(gpt2_tokenizer):
    """Biases on every projection, an untied head, grouped-query heads and another RoPE base."""
    config = transformers.LlamaConfig(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attention_bias=True,
        mlp_bias=True,
        tie_word_embeddings=False,
        rope_theta=5000.0,
    )
    return _randomized(transformers.LlamaForCausalLM(config))


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory, tiny_qwen3, tiny_gpt2, tiny_llama, qwen_tokenizer, gpt2_tokenizer) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("tiny")
    made = {}
    for name, model, tokenizer in (
        ("qwen3", tiny_qwen3, qwen_tokenizer),
        ("gpt2", tiny_gpt2, gpt2_tokenizer),
        ("llama", tiny_llama, gpt2_tokenizer),
    ):
        made[name] = folder / f"{name}.gguf"
        write_gguf(made[name], model.config.to_dict(), model.state_dict(), tokenizer, name=f"tiny {name}")
    return made


IDS = torch.randint(0, 300, (2, 48), generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------------------------------------------------
# 1. Reading the fixture.


def test_read_gives_transformers_config_and_logits(smollm2, prompt, reference_logits):
    config = transformers.AutoConfig.for_model(**smollm2.hf_config)
    assert isinstance(config, transformers.LlamaConfig)
    expected = {
        "architectures": ["LlamaForCausalLM"],
        "num_hidden_layers": 30,
        "hidden_size": 576,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "intermediate_size": 1536,
        "vocab_size": 49152,
        "rope_theta": 100000.0,
        "rope_parameters": {"rope_type": "default", "rope_theta": 100000.0},
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 8192,
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    assert {key: smollm2.hf_config[key] for key in expected} == expected
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in smollm2.tensors.values())
    assert "lm_head.weight" not in smollm2.tensors
    model = transformers.LlamaForCausalLM(config).eval()
    result = model.load_state_dict(smollm2.tensors, strict=False)
    assert result.missing_keys == ["lm_head.weight"] and not result.unexpected_keys
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    difference = (_logits(model, prompt) - reference_logits).abs().max().item()
    assert difference <= TOLERANCE, difference


def test_read_states_the_files_metadata(smollm2):
    meta = smollm2.metadata
    assert meta["general.architecture"] == "llama"
    assert meta["general.name"] == "Smollm2 135M 8k Lc100K Mix1 Ep2"
    assert meta["general.license"] == "apache-2.0"
    assert meta["file_type"] == "MOSTLY_Q4_1"
    assert meta["tensor_types"] == {"Q4_1": 210, "F32": 61, "Q8_0": 1}
    assert meta["context_length"] == 8192
    assert meta["parameters"] == sum(t.numel() for t in smollm2.tensors.values())
    assert "tokenizer.ggml.tokens" not in meta  # the vocabulary is in the tokenizer, not repeated here


@pytest.mark.parametrize(
    ("metadata", "repository"),
    [
        ({"general.source.repo_url": "https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct"},
         "HuggingFaceTB/SmolLM2-135M-Instruct"),
        ({"general.base_model.0.repo_url": "https://huggingface.co/org/base/"}, "org/base"),
        ({"general.source.repo_url": "https://huggingface.co/org/converted",
          "general.base_model.0.repo_url": "https://huggingface.co/org/base"}, "org/converted"),  # its own source first
        ({"general.source.repo_url": "https://huggingface.co/org/name/tree/main"}, None),
        ({"general.source.repo_url": "https://github.com/org/name"}, None),
        ({"general.source.repo_url": "http://huggingface.co/org/name"}, None),
        ({"general.name": "Smollm2 135M"}, None),  # the fixture's case: no source named
    ],
)  # fmt: skip
def test_the_hugging_face_repository_a_file_names_as_its_source(metadata, repository):
    assert anexa_gguf.hub_repository(metadata) == repository


def test_q_and_k_are_unpermuted_from_llamas_interleaved_rotary_layout(smollm2, smollm2_gguf):
    """The file holds llama.cpp's ``permute(w, n_head, n_head_kv)`` of each Q/K projection; read_gguf returns
    transformers' layout, and permuting it again gives the file's values back."""
    reader = gguf.GGUFReader(smollm2_gguf)
    stored = {t.name: t for t in reader.tensors}
    for gguf_name, hf_name, heads in (("attn_q", "q_proj", 9), ("attn_k", "k_proj", 3)):
        tensor = stored[f"blk.0.{gguf_name}.weight"]
        raw = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        ours = smollm2.tensors[f"model.layers.0.self_attn.{hf_name}.weight"].numpy()
        assert not np.array_equal(ours, raw)
        assert np.array_equal(anexa_gguf._to_interleaved(ours, heads), raw)


def test_the_permutation_turns_rotate_half_rope_into_interleaved_rope():
    """Why the permutation: rotate-half RoPE on ``W x`` (transformers) equals interleaved RoPE (llama.cpp's
    normal rope) on ``permute(W) x``, rows permuted the same way."""
    heads, head_dim, width, position = 3, 8, 12, 5.0
    generator = torch.Generator().manual_seed(0)
    weight, x = torch.randn(heads * head_dim, width, generator=generator), torch.randn(width, generator=generator)
    angles = position / 10000 ** (torch.arange(0, head_dim, 2) / head_dim)
    cos, sin = angles.cos(), angles.sin()

    def rotate_half(q):  # pairs (i, i + d/2)
        a, b = q.view(heads, 2, head_dim // 2).unbind(1)
        return torch.stack([a * cos - b * sin, b * cos + a * sin], 1).reshape(-1)

    def interleaved(q):  # pairs (2i, 2i + 1)
        a, b = q.view(heads, head_dim // 2, 2).unbind(2)
        return torch.stack([a * cos - b * sin, b * cos + a * sin], 2).reshape(-1)

    permuted = torch.from_numpy(anexa_gguf._to_interleaved(weight.numpy(), heads))
    expected = torch.from_numpy(anexa_gguf._to_interleaved(rotate_half(weight @ x).numpy(), heads))
    assert torch.allclose(interleaved(permuted @ x), expected, atol=1e-6)
    assert torch.equal(torch.from_numpy(anexa_gguf._to_rotate_half(permuted.numpy(), heads)), weight)


# ---------------------------------------------------------------------------------------------------------
# 2. The tokenizer.


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2) -> PretrainedTokenizer:
    tokenizer = PretrainedTokenizer()
    tokenizer.load_state_dict(smollm2.tokenizer)
    return tokenizer


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_gives_transformers_ids(smollm2_tokenizer, reference_tokenizer, text):
    ids = smollm2_tokenizer.encode(text)
    assert ids == reference_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert smollm2_tokenizer.decode(ids) == text


def test_token_bytes_put_together_every_text_even_where_a_token_splits_a_character(smollm2_tokenizer):
    """OpenAI's logprobs ``bytes``: a byte-level token may hold part of a character (its ``decode`` alone is
    U+FFFD, which ollama and vLLM once reported as its bytes); its own bytes, joined, give the text back."""
    split = 0
    for text in TEXTS:
        ids = smollm2_tokenizer.encode(text)
        pieces = [smollm2_tokenizer.token_bytes(i) for i in ids]
        assert b"".join(pieces) == text.encode("utf-8")
        split += sum(smollm2_tokenizer.decode([i]) == "\ufffd" for i in ids)
        for token_id, piece in zip(ids, pieces, strict=True):
            if "\ufffd" not in smollm2_tokenizer.decode([token_id]):
                assert piece == smollm2_tokenizer.decode([token_id]).encode("utf-8")
    assert split >= 4  # the emoji and CJK text has tokens that split characters
    assert smollm2_tokenizer.token_bytes(2) == b"<|im_end|>"  # a special token: its text
    with pytest.raises(AnexaError, match="outside this tokenizer's 49152 tokens"):
        smollm2_tokenizer.token_bytes(49152)


def test_digits_are_split_one_by_one_as_smollm_pre_means(smollm2_tokenizer, reference_tokenizer):
    """``tokenizer.ggml.pre = smollm`` means llama.cpp splits every digit on its own before GPT-2's regex,
    as SmolLM2's own tokenizer.json does (``Digits(individual_digits=True)``, then ``ByteLevel``).
    transformers 5.25 has no entry for ``smollm`` (``GGUF_PRE_TOKENIZER_SPLITS``) and keeps GPT-2's split
    alone. The vocabulary has no merge with a digit, so the ids only differ where whitespace runs into a
    digit: GPT-2's regex keeps the last space for the number (``Ġ`` ``Ġ`` ``1``), the digit split leaves the
    whole run to the regex (``ĠĠ`` ``1``)."""
    space, two_spaces, one, two = 216, 256, 33, 34
    assert smollm2_tokenizer.encode("x  12") == [104, two_spaces, one, two]
    assert reference_tokenizer("x  12", add_special_tokens=False)["input_ids"] == [104, space, space, one, two]
    assert smollm2_tokenizer.encode("  123") == [two_spaces, one, two, 35]
    assert smollm2_tokenizer.encode("1234567") == list(range(33, 40))
    assert smollm2_tokenizer.encode("Hello world! 123") == [19556, 905, 17, space, one, two, 35]
    pieces = Tokenizer.from_str(smollm2_tokenizer.state_dict()["tokenizer"]).pre_tokenizer.pre_tokenize_str("a  42")
    assert [piece for piece, _ in pieces] == ["a", "ĠĠ", "4", "2"]


def test_tokenizer_state_is_the_hf_plugins(smollm2, smollm2_tokenizer):
    state = smollm2.tokenizer
    assert set(state) == {"type", "tokenizer", "special_tokens", "eos_tokens", "add_bos", "chat_template"}
    assert state["type"] == "hf"
    assert state["special_tokens"] == {
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|im_end|>",
    }
    assert state["eos_tokens"] == []  # <|im_end|> ends a turn and is the EOS already
    assert state["add_bos"] is False
    assert state["chat_template"].startswith("{% for message in messages %}")
    assert smollm2_tokenizer.vocab_size == 49152
    assert smollm2_tokenizer.eos_ids == [2]
    assert smollm2_tokenizer.encode("<|im_start|><|im_end|><repo_name>") == [1, 2, 3]
    added = Tokenizer.from_str(state["tokenizer"]).get_added_tokens_decoder()
    assert [added[i].content for i in range(17)][:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert all(added[i].special for i in range(17)) and len(added) == 17  # the 17 CONTROL tokens


def test_end_of_turn_tokens_come_from_the_template(tiny_files, qwen_tokenizer):
    state = read_gguf(tiny_files["qwen3"]).tokenizer
    assert state["special_tokens"]["eos_token"] == "<|endoftext|>"
    assert state["eos_tokens"] == ["<|im_end|>"]
    tokenizer = PretrainedTokenizer()
    tokenizer.load_state_dict(state)
    assert tokenizer.eos_ids == [0, 2]


# ---------------------------------------------------------------------------------------------------------
# 3. Writing, and reading back.


def test_written_fixture_loads_in_transformers_with_the_same_logits(
    written_smollm2, prompt, reference_logits, tmp_path_factory
):
    folder = gguf_folder(written_smollm2, tmp_path_factory.mktemp("written-load"))
    model = transformers_model(folder, written_smollm2.name)
    difference = (_logits(model, prompt) - reference_logits).abs().max().item()
    assert difference <= TOLERANCE, difference


def test_written_fixture_tokenizes_the_same_in_transformers(written_smollm2, reference_tokenizer, tmp_path_factory):
    folder = gguf_folder(written_smollm2, tmp_path_factory.mktemp("written-tokenizer"))
    tokenizer = transformers_tokenizer(folder, written_smollm2.name)
    for text in [*TEXTS, "x  12", "Price:   42"]:
        expected = reference_tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == expected, text
    assert tokenizer.bos_token == "<|im_start|>" and tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.chat_template == reference_tokenizer.chat_template


def test_written_fixture_reads_back_the_same(written_smollm2, smollm2):
    back = read_gguf(written_smollm2)
    assert back.hf_config == smollm2.hf_config
    assert back.tokenizer == smollm2.tokenizer
    assert back.tensors.keys() == smollm2.tensors.keys()
    assert all(torch.equal(back.tensors[name], smollm2.tensors[name]) for name in smollm2.tensors)
    assert back.metadata["general.name"] == "SmolLM2 135M Instruct"
    assert back.metadata["tensor_types"] == {"F32": 272}
    assert back.metadata["file_type"] == "ALL_F32"
    assert back.metadata["tokenizer.ggml.pre"] == "smollm"
    assert back.metadata["llama.rope.dimension_count"] == back.metadata["llama.attention.key_length"] == 64


@pytest.mark.parametrize("name", ["qwen3", "gpt2"])
def test_tiny_models_load_in_transformers_with_the_same_logits_and_ids(
    name, tiny_files, tiny_qwen3, tiny_gpt2, qwen_tokenizer, gpt2_tokenizer
):
    model, state = (tiny_qwen3, qwen_tokenizer) if name == "qwen3" else (tiny_gpt2, gpt2_tokenizer)
    path = tiny_files[name]
    loaded = transformers_model(path.parent, path.name)
    assert type(loaded) is type(model)
    difference = (_logits(loaded, IDS) - _logits(model, IDS)).abs().max().item()
    assert difference <= TOLERANCE, difference
    ours = Tokenizer.from_str(state["tokenizer"])
    theirs = transformers_tokenizer(path.parent, path.name)
    for text in [*CORPUS[:3], *TEXTS]:
        assert theirs(text, add_special_tokens=False)["input_ids"] == ours.encode(text).ids, text


@pytest.mark.parametrize("name", ["qwen3", "gpt2", "llama"])
def test_tiny_models_read_back_exactly(name, tiny_files, tiny_qwen3, tiny_gpt2, tiny_llama):
    model = {"qwen3": tiny_qwen3, "gpt2": tiny_gpt2, "llama": tiny_llama}[name]
    back = read_gguf(tiny_files[name])
    expected = model.state_dict()
    if model.config.tie_word_embeddings:
        del expected["lm_head.weight"]
    assert back.tensors.keys() == expected.keys()
    assert all(torch.equal(back.tensors[key], expected[key]) for key in expected)
    config = transformers.AutoConfig.for_model(**back.hf_config)
    for key in ("vocab_size", "num_hidden_layers", "hidden_size", "num_attention_heads"):
        assert getattr(config, key) == getattr(model.config, key), key
    if name != "gpt2":
        assert config.num_key_value_heads == model.config.num_key_value_heads
        assert config.head_dim == model.config.head_dim
        assert config.rope_parameters["rope_theta"] == model.config.rope_parameters["rope_theta"]
    rebuilt = type(model)(config).eval()
    rebuilt.load_state_dict(back.tensors, strict=not model.config.tie_word_embeddings)
    assert torch.equal(_logits(rebuilt, IDS), _logits(model, IDS))


def test_llama_biases_and_untied_head_are_written(tiny_files):
    """transformers 5.25 loads this file without its biases (nothing in GGUF metadata says a Llama has them,
    and it sets attention_bias/mlp_bias from the metadata only), so it is checked through read_gguf and the
    names in the file."""
    reader = gguf.GGUFReader(tiny_files["llama"])
    names = {t.name for t in reader.tensors}
    assert {"blk.1.attn_q.bias", "blk.1.attn_output.bias", "blk.1.ffn_down.bias", "output.weight"} <= names
    config = read_gguf(tiny_files["llama"]).hf_config
    assert config["attention_bias"] and config["mlp_bias"] and not config["tie_word_embeddings"]


def test_gpt2_reads_back_any_number_of_positions(tmp_path, gpt2_tokenizer):
    config = transformers.GPT2Config(vocab_size=300, n_embd=16, n_layer=1, n_head=2, n_positions=40, n_inner=24)
    model = _randomized(transformers.GPT2LMHeadModel(config))
    write_gguf(tmp_path / "g.gguf", config.to_dict(), model.state_dict(), gpt2_tokenizer, name="tiny")
    back = read_gguf(tmp_path / "g.gguf")
    assert (back.hf_config["n_positions"], back.hf_config["n_inner"]) == (40, 24)
    assert back.tensors["transformer.h.0.mlp.c_fc.weight"].shape == (16, 24)  # Conv1D: (in, out)
    rebuilt = transformers.GPT2LMHeadModel(transformers.AutoConfig.for_model(**back.hf_config)).eval()
    rebuilt.load_state_dict(back.tensors, strict=False)
    assert torch.equal(_logits(rebuilt, IDS[:, :40]), _logits(model, IDS[:, :40]))


@pytest.mark.parametrize(
    ("dtype", "types", "tolerance"), [("f16", {"F16", "F32"}, 2e-3), ("q8_0", {"Q8_0", "F32"}, 2e-2)]
)
def test_f16_and_q8_0_keep_norms_in_f32(tmp_path, tiny_qwen3, qwen_tokenizer, dtype, types, tolerance):
    path = tmp_path / f"{dtype}.gguf"
    write_gguf(path, tiny_qwen3.config.to_dict(), tiny_qwen3.state_dict(), qwen_tokenizer, name="t", dtype=dtype)
    back = read_gguf(path)
    assert set(back.metadata["tensor_types"]) == types
    assert back.metadata["file_type"] == {"f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0"}[dtype]
    reader = gguf.GGUFReader(path)
    assert all(t.tensor_type.name == "F32" for t in reader.tensors if len(t.shape) == 1)
    for key, value in tiny_qwen3.state_dict().items():
        assert torch.allclose(back.tensors[key], value, atol=tolerance, rtol=tolerance), key


# ---------------------------------------------------------------------------------------------------------
# 4. Errors: one line each, saying what to do; a failed write leaves nothing behind.


def _error(call, *args, **kwargs) -> str:
    with pytest.raises(AnexaError) as caught:
        call(*args, **kwargs)
    message = str(caught.value)
    assert "\n" not in message
    return message


def _copy(path: Path, folder: Path, name: str = "copy.gguf") -> Path:
    target = folder / name
    shutil.copyfile(path, target)
    return target


def _patch(path: Path, key: str, value) -> None:
    """Overwrite a metadata value in place (a string keeps its length)."""
    reader = gguf.GGUFReader(path, "r+")
    field = reader.fields[key]
    part = field.parts[field.data[0]]
    if isinstance(value, str):
        assert len(value.encode()) == len(part)
        part[:] = np.frombuffer(value.encode(), dtype=np.uint8)
    else:
        part[0] = value
    reader.data.flush()


def test_not_a_gguf_file(tmp_path):
    text = tmp_path / "notes.gguf"
    text.write_text("hello, not a model")
    assert _error(read_gguf, text) == (
        f"{text} is not a GGUF file (it does not start with the bytes 'GGUF'): give the path of a .gguf model file"
    )
    missing = tmp_path / "missing.gguf"
    assert _error(read_gguf, missing) == (
        f"{missing} does not exist or is not a file: give the path of a .gguf model file"
    )


def test_flipped_header_bytes(smollm2_gguf, tmp_path, tiny_files):
    head = smollm2_gguf.read_bytes()[:4096]
    bad = tmp_path / "magic.gguf"
    bad.write_bytes(b"GGUX" + head[4:])
    assert _error(read_gguf, bad).startswith(f"{bad} is not a GGUF file")
    bad = tmp_path / "version.gguf"
    bad.write_bytes(head[:4] + bytes([9, 0, 0, 0]) + head[8:])
    assert _error(read_gguf, bad) == (
        f"{bad} is GGUF version 9, which this reader does not handle (versions 2 and 3): the file is corrupt, "
        f"or newer than the gguf package; {FIX} with a current llama.cpp"
    )
    for offset in (15, 23):  # the top byte of the tensor count, then of the metadata count
        data = bytearray(tiny_files["gpt2"].read_bytes())
        data[offset] = 0x40
        bad = tmp_path / f"count{offset}.gguf"
        bad.write_bytes(bytes(data))
        assert _error(read_gguf, bad) == (
            f"{bad} is truncated or corrupt: its {len(data)} bytes end before the data it describes; {FIX}"
        )


@pytest.mark.parametrize("cut", [6, 5000, 40_000_000, -1])
def test_truncated_file(smollm2_gguf, tiny_files, tmp_path, cut):
    """The fixture cut in the header, in the vocabulary, in the tensor data; a tiny file short of its last byte."""
    source = smollm2_gguf if cut > 0 else tiny_files["llama"]
    with open(source, "rb") as handle:
        data = handle.read(cut if cut > 0 else source.stat().st_size + cut)
    short = tmp_path / "short.gguf"
    short.write_bytes(data)
    assert _error(read_gguf, short) == (
        f"{short} is truncated or corrupt: its {len(data)} bytes end before the data it describes; {FIX}"
    )


def test_unsupported_architecture(tiny_files, tmp_path):
    path = _copy(tiny_files["qwen3"], tmp_path)
    _patch(path, "general.architecture", "qwen2")
    assert _error(read_gguf, path) == (
        f"{path} holds a 'qwen2' model; Anexa reads GGUF models of architecture 'gpt2', 'llama', 'qwen3' only: "
        "pick a model of one of those"
    )


def test_unsupported_tokenizer_model_and_pre_tokenizer(tiny_files, tmp_path):
    path = _copy(tiny_files["qwen3"], tmp_path)
    _patch(path, "tokenizer.ggml.model", "bert")
    assert _error(read_gguf, path) == (
        f"{path} has tokenizer model 'bert'; Anexa reads GGUF tokenizers of model 'gpt2' (byte-level BPE) only: "
        "pick a model with a byte-level BPE tokenizer, or import it from its Hugging Face folder"
    )
    path = _copy(tiny_files["qwen3"], tmp_path, "pre.gguf")
    _patch(path, "tokenizer.ggml.pre", "qwen9")
    message = _error(read_gguf, path)
    assert message.startswith(f"{path} has pre-tokenizer 'qwen9', which Anexa's GGUF import does not know (it knows ")
    assert "gpt-2" in message and "smollm" in message and "llama-bpe" in message and "qwen2" in message
    assert message.endswith("): import the model from its Hugging Face folder instead")


def test_a_tokenizer_whose_merges_name_no_token_is_one_line(tiny_files, tmp_path):
    """Found by a QA session (fuzzing one byte at a time): a merge naming a token the vocabulary lacks was
    tokenizers' own exception, a traceback ("Token 'Ġthe' out of vocabulary")."""
    path = _copy(tiny_files["qwen3"], tmp_path)
    reader = gguf.GGUFReader(path, "r+")
    merges = reader.fields["tokenizer.ggml.merges"]
    first = merges.parts[merges.data[0]]
    first[:] = np.frombuffer(b"Q" * (len(first) - 2) + b" Q", dtype=np.uint8)
    reader.data.flush()
    del reader, merges, first
    message = _error(read_gguf, path)
    assert message.startswith(f"{path} has a tokenizer that cannot be built (") and message.endswith(f"); {FIX}")
    assert "out of vocabulary" in message


def test_tensor_type_that_cannot_be_dequantized(tiny_files, tmp_path):
    path = _copy(tiny_files["qwen3"], tmp_path)
    reader = gguf.GGUFReader(path, "r+")
    norm = next(t for t in reader.tensors if t.name == "blk.0.attn_norm.weight")
    norm.field.parts[4][0] = int(gguf.GGMLQuantizationType.I32)  # as wide as F32: the file stays consistent
    reader.data.flush()
    del reader, norm
    assert _error(read_gguf, path) == (
        f"{path}: tensor 'blk.0.attn_norm.weight' has type I32, which the gguf package cannot dequantize: "
        "convert the model with float (F32, F16, BF16) or standard quantized (Q4_0 … Q8_0, K-quant, IQ) types"
    )


def test_tensors_that_do_not_match_the_metadata(tiny_files, tmp_path):
    path = _copy(tiny_files["qwen3"], tmp_path)
    _patch(path, "qwen3.feed_forward_length", 65)
    assert _error(read_gguf, path) == (
        f"{path}: tensor 'blk.0.ffn_gate.weight' has shape (64, 32) but the metadata implies (65, 32): "
        f"the file does not match its metadata; {FIX}"
    )
    # A layer count other than the tensors' is refused before anything is built per layer (found by a QA
    # session: a count of 10**12 built its layers' slots for minutes, gigabytes growing).
    for count in (1, 3, 4_000_000_000):
        path = _copy(tiny_files["qwen3"], tmp_path, f"layers{count}.gguf")
        _patch(path, "qwen3.block_count", count)
        assert _error(read_gguf, path) == (
            f"{path} has metadata qwen3.block_count = {count} but tensors for 2 layers: the file does not match "
            f"its metadata; {FIX}"
        )
    path = _copy(tiny_files["qwen3"], tmp_path, "extra.gguf")
    reader = gguf.GGUFReader(path, "r+")  # a layer's tensor renamed to a name no qwen3 model has
    name = next(t for t in reader.tensors if t.name == "blk.1.attn_norm.weight").field.parts[1]
    name[:] = np.frombuffer(b"blk.1.attn_nrm.weight ", dtype=np.uint8)[: len(name)]
    reader.data.flush()
    assert "which is not part of a qwen3 model with this metadata" in _error(read_gguf, path)


def _patch_offset(path: Path, tensor: str, offset: int) -> None:
    """Overwrite a tensor's stored data offset in place."""
    reader = gguf.GGUFReader(path, "r+")
    next(t for t in reader.tensors if t.name == tensor).field.parts[-1][0] = offset
    reader.data.flush()


def test_tensor_data_outside_the_file_unaligned_or_shared_is_refused(tiny_files, tmp_path):
    """Found by a QA session: gguf's reader wraps an offset near 2**64 around to another place in the data
    and reads it; unaligned offsets and two tensors over the same bytes were accepted too (exit 0, garbage
    weights)."""
    reader = gguf.GGUFReader(tiny_files["qwen3"])
    offsets = {t.name: int(t.field.parts[-1][0]) for t in reader.tensors}
    first, second = sorted(offsets, key=offsets.get)[:2]
    for label, tensor, offset, message in [
        ("wrapped", first, 2**64 - 16, f"tensor {first!r} has data offset {2**64 - 16}"),
        ("unaligned", second, offsets[second] + 1, f"tensor {second!r} has data offset {offsets[second] + 1}"),
        ("shared", second, offsets[first], "share bytes"),
    ]:
        path = _copy(tiny_files["qwen3"], tmp_path, f"{label}.gguf")
        _patch_offset(path, tensor, offset)
        error = _error(read_gguf, path)
        assert error.startswith(f"{path} is corrupt (") and error.endswith(f"); {FIX}"), label
        assert message in error and (label != "shared" or (first in error and second in error)), label


def _write_error(folder: Path, config, tensors, tokenizer, **options) -> str:
    target = folder / "out.gguf"
    message = _error(write_gguf, target, config, tensors, tokenizer, name="t", **options)
    assert list(folder.iterdir()) == []  # nothing written, no temporary file left
    return message.removeprefix(f"cannot write {target}: ")


def test_write_errors_leave_nothing_behind(tmp_path, tiny_qwen3, qwen_tokenizer):
    config, tensors = tiny_qwen3.config.to_dict(), dict(tiny_qwen3.state_dict())
    folder = tmp_path / "out"
    folder.mkdir()
    mistral = config | {"architectures": ["MistralForCausalLM"], "model_type": "mistral"}
    assert _write_error(folder, mistral, tensors, qwen_tokenizer) == (
        "the config is a MistralForCausalLM model; Anexa writes GGUF for LlamaForCausalLM, Qwen3ForCausalLM, "
        "GPT2LMHeadModel only"
    )
    assert _write_error(folder, config, tensors, qwen_tokenizer, dtype="q4_k") == (
        "unknown dtype 'q4_k': choose one of f32, f16, q8_0"
    )
    fewer = {k: v for k, v in tensors.items() if k != "model.layers.1.mlp.up_proj.weight"}
    assert _write_error(folder, config, fewer, qwen_tokenizer) == (
        "tensor 'model.layers.1.mlp.up_proj.weight' is missing: pass every weight of the model"
    )
    more = tensors | {"model.layers.2.mlp.up_proj.weight": torch.zeros(64, 32)}
    assert _write_error(folder, config, more, qwen_tokenizer) == (
        "tensor 'model.layers.2.mlp.up_proj.weight' is not part of a Qwen3ForCausalLM with this config: "
        "remove it or fix the config"
    )
    wrong = tensors | {"model.layers.0.self_attn.k_proj.weight": torch.zeros(256, 32)}
    assert _write_error(folder, config, wrong, qwen_tokenizer) == (
        "tensor 'model.layers.0.self_attn.k_proj.weight' has shape (256, 32) but the config implies (128, 32): "
        "the tensors do not match the config"
    )
    tied = config | {"tie_word_embeddings": True}
    assert _write_error(folder, tied, tensors, qwen_tokenizer) == (
        "lm_head.weight differs from model.embed_tokens.weight but the config ties them: "
        "set tie_word_embeddings to false"
    )
    assert _write_error(folder, config, tensors, {"type": "bpe", "merges": []}) == (
        "tokenizer 'bpe' cannot go into a GGUF file; only the 'hf' tokenizer (byte-level BPE) of an imported model can"
    )
    small = config | {"vocab_size": 200}
    small_tensors = tensors | {k: tensors[k][:200] for k in ("model.embed_tokens.weight", "lm_head.weight")}
    assert _write_error(folder, small, small_tensors, qwen_tokenizer) == (
        "the tokenizer has 300 tokens but the config's vocab_size is 200: they must belong to the same model"
    )
    metaspace = Tokenizer.from_str(qwen_tokenizer["tokenizer"])
    metaspace.pre_tokenizer = pre_tokenizers.Metaspace()
    assert _write_error(folder, config, tensors, qwen_tokenizer | {"tokenizer": metaspace.to_str()}) == (
        "the tokenizer's pre-tokenizer is none of llama.cpp's byte-level splits (gpt-2, smollm, llama-bpe, qwen2), "
        "so llama.cpp would split text differently"
    )


def test_a_failure_while_writing_keeps_the_old_file_and_leaves_no_temporary(
    tmp_path, tiny_qwen3, qwen_tokenizer, monkeypatch
):
    target = tmp_path / "model.gguf"
    target.write_bytes(b"the old model")

    def disk_full(self, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", disk_full)
    config, tensors = tiny_qwen3.config.to_dict(), tiny_qwen3.state_dict()
    assert _error(write_gguf, target, config, tensors, qwen_tokenizer, name="t") == (
        f"cannot write {target}: No space left on device: free space or pick another folder"
    )
    assert list(tmp_path.iterdir()) == [target]
    assert target.read_bytes() == b"the old model"
