"""`anexa serve`'s API beyond one plain completion: n choices, logprobs, echo, batches of prompts (text or token
ids), the tokenizer routes, refused and accepted fields, chat through a model's own Jinja template, and a
failing sampler. Every expectation is the core's: texts from `generate_text` with the same seed, log-probabilities
from the model's own log-softmax. The models are small and random (no training), so the module is quick."""

import dataclasses
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import ClassVar

import pytest

pytest.importorskip("fastapi", reason="anexa serve needs the serve extra: pip install -e '.[dev]'")
httpx = pytest.importorskip("httpx")

import torch  # noqa: E402
from helpers import assert_error, running, trained_tokenizer  # noqa: E402

from anexa_core import hookimpl, plugins  # noqa: E402
from anexa_core.config import ModelConfig  # noqa: E402
from anexa_core.errors import AnexaError  # noqa: E402
from anexa_core.infer.chat import JinjaTemplate, Transcript  # noqa: E402
from anexa_core.infer.generation import encode_prompt, generate_ids, generate_text  # noqa: E402
from anexa_core.infer.sampling import build_chain  # noqa: E402
from anexa_core.model.gpt import build_model  # noqa: E402
from anexa_serve import ServeConfig, ServedModel, create_app  # noqa: E402
from anexa_serve.chat import check_override_used  # noqa: E402

BLOCK = 32
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# --- fixtures ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def text(sherlock_path):
    return sherlock_path.read_text(encoding="utf-8")[:60_000]


def _served(name, tokenizer, blocks="gpt2", seed=0, tokenizer_name="char", block_size=BLOCK):
    torch.manual_seed(seed)
    config = ModelConfig(
        vocab_size=tokenizer.vocab_size, n_layer=1, n_head=2, n_embd=32, block_size=block_size, blocks=blocks
    )
    model = build_model(config).eval()
    return ServedModel(name, model, tokenizer, {"tokenizer": {"name": tokenizer_name}}, Path(name), 0)


@pytest.fixture(scope="module")
def tiny(text):
    """A random gpt2-blocks model over a char tokenizer of the book."""
    return _served("tiny", trained_tokenizer("char", text))


@pytest.fixture(scope="module")
def chatml(text):
    """A random llama-blocks model over a byte-level BPE with ChatML's special tokens and template (an `hf`
    tokenizer, as `anexa import` makes for a pretrained chat model)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|im_start|>", "<|im_end|>"],
        show_progress=False,
    )
    bpe.train_from_iterator([text], trainer)
    tokenizer, _ = plugins.create("tokenizers", "hf", {})
    tokenizer.load_state_dict(
        {
            "type": "hf",
            "tokenizer": bpe.to_str(),
            "special_tokens": {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"},
            "eos_tokens": ["<|im_end|>"],
            "chat_template": CHATML,
        }
    )
    return _served("chatml", tokenizer, blocks="llama", seed=1, tokenizer_name="hf")


RECOMMENDED = ("temperature=0.5", "top_p=0.7")


@pytest.fixture(scope="module")
def app(tiny, chatml):
    """The models, and `tiny` again as `recommends`: a model whose makers recommend a sampling (an import's)."""
    recommends = dataclasses.replace(tiny, name="recommends", sampling=RECOMMENDED)
    models = {"tiny": tiny, "chatml": chatml, "recommends": recommends}
    return create_app(models, ServeConfig(max_tokens_cap=400, parallel=8, queue=8))


@pytest.fixture(scope="module")
def url(app):
    with running(app) as base:
        yield base


@pytest.fixture(scope="module")
def client(url):
    with httpx.Client(base_url=url, timeout=60) as http:
        yield http


# --- helpers -----------------------------------------------------------------------------------------


def expected(served, prompt, max_tokens, seed, specs=(), temperature=None, stop=()):
    chain = build_chain(list(specs), temperature)
    return "".join(generate_text(served.model, served.tokenizer, prompt, max_tokens, chain, seed, list(stop)))


def post(client, path, body):
    response = client.post(path, json=body)
    assert response.status_code == 200, response.text
    return response.json()


def events(client, path, body):
    with client.stream("POST", path, json={**body, "stream": True}) as response:
        assert response.status_code == 200, response.read()
        lines = [line[len("data: ") :] for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def log_softmax(served, ids):
    """(T, V) float64: row t is log p(· | ids[:t + 1]) by the model's own forward pass."""
    with torch.no_grad():
        logits, _ = served.model(torch.tensor([ids]))
    return torch.log_softmax(logits[0].double(), -1)


# --- n, batches, token ids ----------------------------------------------------------------------------


def test_n_choices_equal_n_separate_seeded_requests(client, tiny):
    body = {"model": "tiny", "prompt": "Holmes", "max_tokens": 30, "seed": 40, "n": 3, "temperature": 0.9}
    answer = post(client, "/v1/completions", body)
    want = [expected(tiny, "Holmes", 30, 40 + i, temperature=0.9) for i in range(3)]
    assert [c["index"] for c in answer["choices"]] == [0, 1, 2]
    assert [c["text"] for c in answer["choices"]] == want and len(set(want)) == 3
    assert answer["usage"] == {"prompt_tokens": 6, "completion_tokens": 90, "total_tokens": 96}
    streamed = ["", "", ""]
    for chunk in events(client, "/v1/completions", body):
        (choice,) = chunk["choices"]
        streamed[choice["index"]] += choice["text"]
    assert streamed == want

    chat = {"model": "tiny", "messages": [{"role": "user", "content": "Who?"}], "max_tokens": 20, "seed": 3, "n": 2}
    prompt = "User: Who?\nAssistant:"
    stops = ["\n\n", "\nUser:", "\nAssistant:"]
    reply = post(client, "/v1/chat/completions", chat)
    assert [c["message"]["content"] for c in reply["choices"]] == [
        expected(tiny, prompt, 20, 3 + i, stop=stops) for i in range(2)
    ]
    chunks = events(client, "/v1/chat/completions", chat)
    assert [c["choices"][0]["delta"] for c in chunks[:2]] == [{"role": "assistant", "content": ""}] * 2
    assert {c["choices"][0]["index"] for c in chunks} == {0, 1}


def test_a_request_that_chooses_no_sampling_gets_what_the_models_makers_recommend(client, tiny):
    """Any of temperature, top_p or anexa.samplers replaces the recommendation whole; /v1/models shows it."""
    body = {"model": "recommends", "prompt": "Holmes", "max_tokens": 30, "seed": 5}
    recommended = expected(tiny, "Holmes", 30, 5, RECOMMENDED)
    assert post(client, "/v1/completions", body)["choices"][0]["text"] == recommended
    assert recommended != expected(tiny, "Holmes", 30, 5)
    chosen = {"temperature": 0.9}, {"top_p": 0.7}, {"anexa": {"samplers": ["min_p=0.1"]}}
    for fields, specs in zip(chosen, (["temperature=0.9"], ["top_p=0.7"], ["min_p=0.1"]), strict=True):
        assert post(client, "/v1/completions", {**body, **fields})["choices"][0]["text"] == expected(
            tiny, "Holmes", 30, 5, specs
        ), fields
    chat = {"model": "recommends", "messages": [{"role": "user", "content": "Who?"}], "max_tokens": 20, "seed": 2}
    stops = ["\n\n", "\nUser:", "\nAssistant:"]
    reply = post(client, "/v1/chat/completions", chat)["choices"][0]["message"]["content"]
    assert reply == expected(tiny, "User: Who?\nAssistant:", 20, 2, RECOMMENDED, stop=stops)
    cards = {card["id"]: card["anexa"]["sampling"] for card in client.get("/v1/models").json()["data"]}
    assert cards == {"tiny": [], "chatml": [], "recommends": list(RECOMMENDED)}


def test_batches_of_prompts_text_or_token_ids(client, tiny):
    watson = encode_prompt(tiny.tokenizer, "Watson")
    body = {"model": "tiny", "prompt": ["Holmes", watson], "max_tokens": 12, "seed": 7, "n": 2}
    answer = post(client, "/v1/completions", body)
    want = [
        expected(tiny, p, 12, 7 + p_index * 2 + j) for p_index, p in enumerate(["Holmes", "Watson"]) for j in (0, 1)
    ]
    assert [c["text"] for c in answer["choices"]] == want
    assert answer["usage"]["prompt_tokens"] == 12  # once per prompt, not per choice
    single = post(client, "/v1/completions", {"model": "tiny", "prompt": watson, "max_tokens": 12, "seed": 9})
    assert single["choices"][0]["text"] == expected(tiny, "Watson", 12, 9)
    nested = post(client, "/v1/completions", {"model": "tiny", "prompt": [watson], "max_tokens": 12, "seed": 9})
    assert nested["choices"][0]["text"] == single["choices"][0]["text"]


# --- logprobs and echo --------------------------------------------------------------------------------


def test_completion_logprobs_are_the_models_log_softmax(client, tiny):
    body = {"model": "tiny", "prompt": "Baker", "max_tokens": 12, "seed": 5, "logprobs": 3, "temperature": 0.8}
    (choice,) = post(client, "/v1/completions", body)["choices"]
    logprobs = choice["logprobs"]
    prompt = encode_prompt(tiny.tokenizer, "Baker")
    generated = encode_prompt(tiny.tokenizer, choice["text"])
    assert "".join(logprobs["tokens"]) == choice["text"] == expected(tiny, "Baker", 12, 5, temperature=0.8)
    assert logprobs["text_offset"] == list(range(5, 5 + 12))  # one character per token, after the prompt
    logp = log_softmax(tiny, prompt + generated)
    for step, (token, score, top) in enumerate(
        zip(generated, logprobs["token_logprobs"], logprobs["top_logprobs"], strict=True)
    ):
        row = logp[len(prompt) - 1 + step]
        assert score == pytest.approx(float(row[token]), abs=1e-4)
        best = {tiny.tokenizer.decode([i]) for i in row.topk(3).indices.tolist()}
        assert set(top) == best | {tiny.tokenizer.decode([token])}  # the top 3 and the chosen token
        assert all(
            value == pytest.approx(float(row[tiny.tokenizer.encode(t)[0]]), abs=1e-4) for t, value in top.items()
        )
    streamed = events(client, "/v1/completions", body)
    tokens = [t for c in streamed for t in (c["choices"][0]["logprobs"] or {}).get("tokens", [])]
    offsets = [o for c in streamed for o in (c["choices"][0]["logprobs"] or {}).get("text_offset", [])]
    assert tokens == logprobs["tokens"] and offsets == logprobs["text_offset"]


def test_chat_logprobs_and_top_logprobs(client, tiny):
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 8,
        "seed": 2,
        "logprobs": True,
        "top_logprobs": 2,
    }
    (choice,) = post(client, "/v1/chat/completions", body)["choices"]
    content = choice["logprobs"]["content"]
    prompt = encode_prompt(tiny.tokenizer, "User: Hi\nAssistant:")
    ids = [tiny.tokenizer.encode(entry["token"])[0] for entry in content]
    assert "".join(entry["token"] for entry in content).startswith(choice["message"]["content"])
    logp = log_softmax(tiny, prompt + ids)
    for step, entry in enumerate(content):
        row = logp[len(prompt) - 1 + step]
        assert entry["logprob"] == pytest.approx(float(row[ids[step]]), abs=1e-4)
        assert entry["bytes"] == list(entry["token"].encode())
        assert [t["token"] for t in entry["top_logprobs"]] == [tiny.tokenizer.decode([i]) for i in row.topk(2).indices]
    plain = post(client, "/v1/chat/completions", {**body, "logprobs": False, "top_logprobs": None})
    assert plain["choices"][0]["logprobs"] is None
    assert plain["choices"][0]["message"] == choice["message"]


def test_logprobs_give_each_tokens_own_bytes_where_tokens_split_a_character(client, chatml):
    """A newcomer's report: with a byte-level tokenizer every token holding part of an emoji had the bytes
    of U+FFFD and the text "�" (so top_logprobs merged different tokens under one key) and moved
    text_offset one character each. Now: each token's own bytes, which joined are the text; a text that
    tells such tokens apart; offsets counting whole characters."""
    prompt = "Holmes 🌌 and 中文 café"
    ids = chatml.tokenizer.encode(prompt)
    pieces = [chatml.tokenizer.token_bytes(i) for i in ids]
    assert b"".join(pieces) == prompt.encode() and sum(chatml.tokenizer.decode([i]) == "\ufffd" for i in ids) >= 3
    body = {"model": "chatml", "prompt": ids, "echo": True, "logprobs": 2, "max_tokens": 0}
    logprobs = post(client, "/v1/completions", body)["choices"][0]["logprobs"]
    assert logprobs["tokens"] == [piece.decode("utf-8", errors="backslashreplace") for piece in pieces]
    assert "\\xf0\\x9f" in "".join(logprobs["tokens"]) and "\ufffd" not in "".join(logprobs["tokens"])
    before = [len(b"".join(pieces[:i]).decode("utf-8", errors="ignore")) for i in range(len(ids))]
    assert logprobs["text_offset"] == before and before[-1] == len(prompt) - 1  # é's last byte starts at é
    for top in logprobs["top_logprobs"][1:]:
        assert len(top) >= 2  # two alternatives and the chosen token: distinct texts, none merged
    chat = {"model": "chatml", "messages": [{"role": "user", "content": prompt}], "max_tokens": 24, "seed": 3}
    chat.update(logprobs=True, top_logprobs=3, temperature=1.5)
    (choice,) = post(client, "/v1/chat/completions", chat)["choices"]
    content = choice["logprobs"]["content"]
    generated = b"".join(bytes(entry["bytes"]) for entry in content)
    assert choice["message"]["content"] in generated.decode("utf-8", errors="replace")
    for entry in content:
        assert bytes(entry["bytes"]).decode("utf-8", errors="backslashreplace") == entry["token"]
        assert len({alternative["token"] for alternative in entry["top_logprobs"]}) == 3


def test_echo_scores_the_prompt_as_lm_eval_asks(client, tiny):
    """lm-evaluation-harness's loglikelihood request: token ids, echo, logprobs 1, max_tokens 1 (or 0), a
    prompt of up to the context plus one token; the first token has no log-probability."""
    ids = encode_prompt(tiny.tokenizer, "It is a capital mistake to theorize before one has data.")[: BLOCK + 1]
    logp = log_softmax(tiny, ids[:-1])
    want = [None] + [pytest.approx(float(logp[t - 1, ids[t]]), abs=1e-4) for t in range(1, len(ids))]
    for max_tokens in (0, 1):
        body = {"model": "tiny", "prompt": [ids, ids[:10]], "echo": True, "logprobs": 1, "max_tokens": max_tokens}
        body.update(temperature=0, seed=1234)
        first, second = post(client, "/v1/completions", body)["choices"]
        scores = first["logprobs"]["token_logprobs"]
        assert scores[: len(ids)] == want and len(scores) == len(ids) + max_tokens
        assert first["logprobs"]["top_logprobs"][0] is None and first["text"].startswith(tiny.tokenizer.decode(ids))
        assert second["logprobs"]["token_logprobs"][1:10] == pytest.approx(scores[1:10], abs=1e-5)
        assert first["finish_reason"] == "length"
    assert first["logprobs"]["text_offset"][: len(ids)] == list(range(len(ids)))
    chunks = events(client, "/v1/completions", {"model": "tiny", "prompt": "Holmes", "echo": True, "max_tokens": 5})
    assert chunks[0]["choices"][0]["text"] == "Holmes"  # the prompt comes first
    too_long = {"model": "tiny", "prompt": ids + ids, "echo": True, "max_tokens": 0}
    assert "at most 33 tokens" in assert_error(client.post("/v1/completions", json=too_long), 400, "prompt")["message"]


def test_the_openai_package_reads_n_logprobs_and_echo(url, tiny):
    openai = pytest.importorskip("openai")
    api = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    answer = api.completions.create(model="tiny", prompt="Holmes", n=2, max_tokens=5, seed=3, logprobs=2, echo=True)
    assert [c.index for c in answer.choices] == [0, 1]
    assert answer.choices[1].text == "Holmes" + expected(tiny, "Holmes", 5, 4)
    assert answer.choices[0].logprobs.token_logprobs[0] is None and len(answer.choices[0].logprobs.tokens) == 11
    messages = [{"role": "user", "content": "Hi"}]
    reply = api.chat.completions.create(model="tiny", messages=messages, max_tokens=4, logprobs=True, top_logprobs=3)
    entry = reply.choices[0].logprobs.content[0]
    assert len(entry.top_logprobs) == 3 and entry.logprob <= entry.top_logprobs[0].logprob
    chunks = list(api.completions.create(model="tiny", prompt="Holmes", n=2, max_tokens=5, seed=3, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices[0].index == 1) == expected(tiny, "Holmes", 5, 4)


# --- the tokenizer routes -----------------------------------------------------------------------------


def test_tokenizer_routes_give_the_servers_own_ids(client, tiny, chatml):
    ids = client.post("/tokenize", json={"model": "tiny", "prompt": "Holmes"}).json()
    assert ids == {"count": 6, "max_model_len": BLOCK, "tokens": tiny.tokenizer.encode("Holmes")}
    assert client.post("/detokenize", json={"model": "tiny", "tokens": ids["tokens"]}).json() == {"prompt": "Holmes"}
    info = client.get("/tokenizer_info", params={"model": "chatml"}).json()
    assert info["eos_token"] == "<|im_end|>" and info["chat_template"] == CHATML and info["model_max_length"] == BLOCK
    assert client.get("/tokenizer_info", params={"model": "tiny"}).json()["eos_token"] is None
    assert_error(client.get("/tokenizer_info"), 400, "model")  # two models: name one
    assert_error(client.post("/detokenize", json={"model": "tiny", "tokens": [10**6]}), 400, "tokens")


# --- refused and accepted fields ----------------------------------------------------------------------

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 3, "seed": 1}
TEXT = {"model": "tiny", "prompt": "x", "max_tokens": 3, "seed": 1}
REFUSED = {
    "unknown field": ("/v1/completions", {**TEXT, "frequency": 1}, "frequency"),
    "unknown field named like a type": ("/v1/completions", {**TEXT, "int": 1}, "int"),
    "unknown field with a dash": ("/v1/completions", {**TEXT, "a-b": 1}, "a-b"),
    "17 stop strings": ("/v1/completions", {**TEXT, "stop": [f"s{i}" for i in range(17)]}, "stop"),
    "a stop string of 257 characters": ("/v1/completions", {**TEXT, "stop": ["s" * 257]}, "stop[0]"),
    "a message without content": (
        "/v1/chat/completions",
        {**CHAT, "messages": [{"role": "user"}]},
        "messages[0].content",
    ),
    "null content": (
        "/v1/chat/completions",
        {**CHAT, "messages": [{"role": "user", "content": None}]},
        "messages[0].content",
    ),
    "no content parts": (
        "/v1/chat/completions",
        {**CHAT, "messages": [{"role": "user", "content": []}]},
        "messages[0].content",
    ),
    "a sampler option twice": (
        "/v1/completions",
        {**TEXT, "anexa": {"samplers": ["top_p=0.5", "top_p=0.9"]}},
        "anexa.samplers",
    ),
    "unknown chat field": ("/v1/chat/completions", {**CHAT, "reasoning_effort": "low"}, "reasoning_effort"),
    "unknown message field": (
        "/v1/chat/completions",
        {**CHAT, "messages": [{"role": "user", "content": "x", "name": "a"}]},
        "messages[0].name",
    ),
    "logit_bias": ("/v1/completions", {**TEXT, "logit_bias": {"5": 10}}, "logit_bias"),
    "response_format json": (
        "/v1/chat/completions",
        {**CHAT, "response_format": {"type": "json_object"}},
        "response_format",
    ),
    "tool_choice required": ("/v1/chat/completions", {**CHAT, "tool_choice": "required"}, "tool_choice"),
    "tools": ("/v1/chat/completions", {**CHAT, "tools": [{"type": "function"}]}, "tools"),
    "functions": ("/v1/chat/completions", {**CHAT, "functions": [{"name": "f"}]}, "functions"),
    "store": ("/v1/chat/completions", {**CHAT, "store": True}, "store"),
    "chat logprobs 0": ("/v1/chat/completions", {**CHAT, "logprobs": 0}, "logprobs"),
    "top_logprobs alone": ("/v1/chat/completions", {**CHAT, "top_logprobs": 2}, "top_logprobs"),
    "top_logprobs 21": ("/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    "logprobs 21": ("/v1/completions", {**TEXT, "logprobs": 21}, "logprobs"),
    "logprobs true": ("/v1/completions", {**TEXT, "logprobs": True}, "logprobs"),
    "best_of": ("/v1/completions", {**TEXT, "best_of": 2}, "best_of"),
    "suffix": ("/v1/completions", {**TEXT, "suffix": "end"}, "suffix"),
    "presence_penalty": ("/v1/completions", {**TEXT, "presence_penalty": 0.5}, "presence_penalty"),
    "max_tokens 0 without echo": ("/v1/completions", {**TEXT, "max_tokens": 0}, "max_tokens"),
    "n 0": ("/v1/completions", {**TEXT, "n": 0}, "n"),
    "n beyond the queue": ("/v1/completions", {**TEXT, "n": 17}, "n"),
    "token id outside": ("/v1/completions", {**TEXT, "prompt": [1, 10**6]}, "prompt"),
    "empty ids": ("/v1/completions", {**TEXT, "prompt": [[]]}, "prompt[0]"),
    "bad prompt in a batch": ("/v1/completions", {**TEXT, "prompt": ["x", "日本"]}, "prompt[1]"),
    "tool role": ("/v1/chat/completions", {**CHAT, "messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
    "image part": (
        "/v1/chat/completions",
        {**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        "messages[0].content[0].type",
    ),
    "template keys for a jinja model": (
        "/v1/chat/completions",
        {**CHAT, "model": "chatml", "anexa": {"chat_template": {"user": "Q: {content}"}}},
        "anexa.chat_template",
    ),
    "template keys for a completion": (
        "/v1/completions",
        {**TEXT, "anexa": {"chat_template": {"user": "Q: {content}"}}},
        "anexa.chat_template",
    ),
    "max_completion_tokens on completions": (
        "/v1/completions",
        {**TEXT, "max_completion_tokens": 3},
        "max_completion_tokens",
    ),
    "max_completion_tokens 0": (
        "/v1/chat/completions",
        {**CHAT, "max_tokens": None, "max_completion_tokens": 0},
        "max_completion_tokens",
    ),
    "max_completion_tokens over the cap": (
        "/v1/chat/completions",
        {**CHAT, "max_tokens": None, "max_completion_tokens": 401},
        "max_completion_tokens",
    ),
}


@pytest.mark.parametrize("case", REFUSED)
def test_fields_not_honoured_are_refused_naming_them(client, case):
    path, body, param = REFUSED[case]
    error = assert_error(client.post(path, json=body), 400, param)
    assert "Traceback" not in error["message"] and error["code"] is not None


def test_the_most_stop_strings_and_the_longest_are_accepted(client):
    """The near misses of the stop limits (16 strings, 256 characters), and every error has a code."""
    most = [f"s{i}" for i in range(15)] + ["s" * 256]
    assert post(client, "/v1/completions", {**TEXT, "stop": most})["choices"][0]["finish_reason"]
    assert post(client, "/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": ""}]})["choices"]
    assert (
        assert_error(client.post("/v1/completions", json={**TEXT, "prompt": [1, 10**6]}), 400)["code"]
        == "invalid_value"
    )


def test_fields_that_change_nothing_are_accepted(client):
    plain = post(client, "/v1/chat/completions", CHAT)["choices"][0]["message"]
    extras = {
        "user": "someone",
        "metadata": {"run": "1"},
        "store": False,
        "safety_identifier": "x",
        "prompt_cache_key": "k",
        "parallel_tool_calls": False,
        "tool_choice": "none",
        "response_format": {"type": "text"},
        "modalities": ["text"],
        "presence_penalty": 0,
        "logit_bias": {},
        "n": 1,
    }
    assert post(client, "/v1/chat/completions", {**CHAT, **extras})["choices"][0]["message"] == plain
    text = {**TEXT, "user": "someone", "best_of": 1, "echo": False, "suffix": None, "logprobs": None}
    assert (
        post(client, "/v1/completions", text)["choices"][0]["text"]
        == post(client, "/v1/completions", TEXT)["choices"][0]["text"]
    )


def test_max_tokens_and_max_completion_tokens_are_one_limit(client, tiny):
    """max_completion_tokens is OpenAI's newer name for chat's max_tokens: either sets the limit, both must agree
    (the audit's near miss: max_tokens 5 and max_completion_tokens 2 gave 5 tokens, the 2 silently dropped)."""
    no_stops = {"chat_template": {"stop": []}}  # every choice runs to its limit
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Who?"}], "seed": 3, "anexa": no_stops}

    def completion_tokens(**limits):
        return post(client, "/v1/chat/completions", {**body, **limits})["usage"]["completion_tokens"]

    assert completion_tokens(max_tokens=5) == 5
    assert completion_tokens(max_completion_tokens=2) == 2
    assert completion_tokens(max_tokens=2, max_completion_tokens=2) == 2
    assert completion_tokens(max_tokens=None, max_completion_tokens=2) == 2
    assert completion_tokens(max_tokens=5, max_completion_tokens=None) == 5
    for tokens, completion in ((5, 2), (2, 5)):
        response = client.post(
            "/v1/chat/completions", json={**body, "max_tokens": tokens, "max_completion_tokens": completion}
        )
        error = assert_error(response, 400, "max_completion_tokens", "unsupported")
        assert "max_tokens" in error["message"].replace("max_completion_tokens", "")
    streamed = {**body, "max_tokens": 5, "max_completion_tokens": 2, "stream": True}
    assert_error(client.post("/v1/chat/completions", json=streamed), 400, "max_completion_tokens")


def test_stream_options_only_with_stream_true(client):
    """OpenAI refuses stream_options unless stream is true; so does Anexa (it used to accept and ignore it)."""
    options = {"include_usage": True, "include_obfuscation": False}
    for path, body in (("/v1/chat/completions", CHAT), ("/v1/completions", TEXT)):
        chunks = events(client, path, {**body, "stream_options": options})
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3
        assert "usage" not in events(client, path, {**body, "stream_options": {"include_usage": False}})[-1]
        for stream in ({"stream": False}, {"stream": None}, {}):
            refused = client.post(path, json={**body, **stream, "stream_options": options})
            assert "stream: true" in assert_error(refused, 400, "stream_options", "unsupported")["message"]
        assert post(client, path, {**body, "stream": False, "stream_options": None})["choices"]


# --- chat through the model's own template ------------------------------------------------------------


def test_chat_renders_the_models_jinja_template_and_stops_at_its_end_of_turn(client, chatml):
    tokenizer = chatml.tokenizer
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who is at the door?"}]
    template = JinjaTemplate(CHATML, tokenizer.special_tokens)
    ids = encode_prompt(tokenizer, template.render(messages), bos=False)
    # A seed whose reply ends at the end-of-turn id before max_tokens (the model is random).
    seed = next(s for s in range(200) if len(_ids(chatml, ids, s)) < 100)
    want = expected(chatml, ids, 100, seed, temperature=2.0, stop=["<|im_start|>", "<|im_end|>"])
    body = {"model": "chatml", "messages": messages, "max_tokens": 100, "seed": seed, "temperature": 2.0}
    answer = post(client, "/v1/chat/completions", body)
    (choice,) = answer["choices"]
    assert choice["message"]["content"] == want and "<|im" not in want
    assert choice["finish_reason"] == "stop" and answer["usage"]["prompt_tokens"] == min(len(ids), BLOCK)


def _ids(served, ids, seed):
    """The ids generated at temperature 2, up to 100 or the end-of-turn id."""
    generator = torch.Generator().manual_seed(seed)
    stop_ids = served.tokenizer.eos_ids
    return list(generate_ids(served.model, ids, 100, build_chain([], 2.0), generator, stop_ids=stop_ids))


def test_a_jinja_file_replaces_every_models_template(tiny):
    source = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
    app = create_app({"tiny": tiny}, ServeConfig(chat_template=source))
    with running(app) as url, httpx.Client(base_url=url, timeout=60) as http:
        body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 15, "seed": 4}
        reply = post(http, "/v1/chat/completions", body)
        assert reply["choices"][0]["message"]["content"] == expected(tiny, "user: Hi\nassistant:", 15, 4)
        assert http.get("/tokenizer_info").json()["chat_template"] == source


def test_a_transcript_file_for_models_that_all_have_their_own_template_is_refused(tiny, chatml):
    # Found by a QA session: `serve -m SMOLLM2 --chat-template plain.toml` started, and the file changed nothing.
    transcript, path = Transcript(user="Q: {content}\n"), Path("/somewhere/plain.toml")
    with pytest.raises(AnexaError) as caught:
        check_override_used(path, transcript, {"chatml": chatml.tokenizer, "chatml-2": chatml.tokenizer})
    assert str(caught.value) == (
        "--chat-template plain.toml is a transcript for models without a template of their own, and chatml, "
        "chatml-2 have one: give a FILE.jinja to replace it, or leave --chat-template out"
    )
    check_override_used(path, transcript, {"chatml": chatml.tokenizer, "tiny": tiny.tokenizer})  # tiny's transcript
    check_override_used(path, "{{ messages }}", {"chatml": chatml.tokenizer})  # Jinja replaces every template


def test_chat_with_smollm2_through_its_own_template_answers_paris(smollm2):
    served = ServedModel("smol", smollm2.model, smollm2.tokenizer, smollm2.meta, Path("smol"), 0)
    app = create_app({"smol": served})
    body = {"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 60}
    with running(app) as url, httpx.Client(base_url=url, timeout=120) as http:
        answer = post(http, "/v1/chat/completions", {**body, "temperature": 0})
    (choice,) = answer["choices"]
    assert "Paris" in choice["message"]["content"] and "<|im" not in choice["message"]["content"]
    assert choice["finish_reason"] == "stop" and answer["usage"]["completion_tokens"] < 60


# --- one request's failure is its own ----------------------------------------------------------------


class _Breaks:
    """A sampler that raises once the context is 8 tokens long."""

    order = 25

    def __call__(self, logits, context):
        if context.size(-1) >= 8:
            raise AnexaError("the breaking sampler broke")
        return logits


class _BreaksPlugin:
    @hookimpl
    def register_samplers(self, register):
        register("breaks", _Breaks)


def test_equal_chains_that_fail_on_one_row_fail_only_that_request():
    """The engine processes the rows of equal chains at once; when that raises, each row is processed alone,
    so only the request whose row fails gets the error (and the argmax) — unit level, the server's wrapper."""
    from dataclasses import dataclass
    from typing import ClassVar

    from anexa_core.infer.sampling import SamplerChain, pick_rows
    from anexa_serve.engine import _Isolated

    @dataclass
    class FailsOnTokenZero:
        order: ClassVar[int] = 60
        reads_context: ClassVar[bool] = False

        def __call__(self, logits, context):
            if (logits.argmax(-1) == 0).any():
                raise AnexaError("token 0 is cursed")
            return logits

    guards = [_Isolated(SamplerChain([FailsOnTokenZero()])) for _ in range(3)]
    logits = torch.tensor([[0.0, 5.0, 1.0], [9.0, 0.0, 1.0], [0.0, 1.0, 7.0]])
    contexts = [torch.zeros(1, 0, dtype=torch.long)] * 3
    generators = [torch.Generator().manual_seed(row) for row in range(3)]
    picks = pick_rows(guards, logits, contexts, generators)
    assert [guard.error is not None for guard in guards] == [False, True, False]
    assert "cursed" in str(guards[1].error) and picks[1] == 0


def test_a_failing_sampler_fails_only_its_own_request(client, tiny, register_plugin):
    register_plugin(_BreaksPlugin(), "breaks-test")
    healthy = {"model": "tiny", "prompt": "Holmes", "max_tokens": 300, "seed": 8}
    broken = {"model": "tiny", "prompt": "Holmes", "max_tokens": 60, "anexa": {"samplers": ["breaks"]}}
    with client.stream("POST", "/v1/completions", json={**healthy, "stream": True}) as running_one:
        lines = running_one.iter_lines()
        assert next(lines).startswith("data: ")  # decoding beside the broken one
        error = assert_error(client.post("/v1/completions", json=broken), 400, code="generation_failed")
        assert "broke" in error["message"]
        rest = [line[6:] for line in lines if line.startswith("data: ")]
    assert rest[-1] == "[DONE]" and all("error" not in json.loads(r) for r in rest[:-1])
    assert post(client, "/v1/completions", healthy)["choices"][0]["text"] == expected(tiny, "Holmes", 300, 8)


def test_the_kv_cache_budget_makes_requests_wait_and_refuses_one_that_cannot_fit(tiny):
    """`anexa serve --max-cache-tokens`: the requests that fit are answered, two at a time where the budget
    holds two rows (the context is BLOCK positions, less than the 64 a cache starts with, so a row takes
    BLOCK); a request that may need more KV-cache positions than the budget even alone is a 400 naming
    max_tokens (a cache starts at 64 positions and doubles: a 1-token prompt and 50 new tokens fit 64, with 100 they
    need 128); a budget smaller than any cache cannot start a server."""
    app = create_app({"tiny": tiny}, ServeConfig(max_tokens_cap=400, parallel=8, queue=8, max_cache_tokens=2 * BLOCK))
    decoder = app.state.server.decoders["tiny"]
    with running(app) as base, httpx.Client(base_url=base, timeout=60) as http:
        fits = {**TEXT, "max_tokens": 30}
        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(lambda seed: post(http, "/v1/completions", {**fits, "seed": seed}), range(6)))
        assert all(answer["usage"]["completion_tokens"] == 30 for answer in answers)
        assert 1 <= decoder.stats.peak_rows <= 2  # the others waited for room
    with pytest.raises(AnexaError, match="fits no request"):
        create_app({"tiny": tiny}, ServeConfig(max_cache_tokens=BLOCK - 1))
    wide = _served("wide", tiny.tokenizer, block_size=256)
    small = create_app({"wide": wide}, ServeConfig(max_tokens_cap=400, max_cache_tokens=127))
    with running(small) as base, httpx.Client(base_url=base, timeout=60) as http:
        assert post(http, "/v1/completions", {**TEXT, "model": "wide", "max_tokens": 50})["choices"][0]["text"]
        error = assert_error(
            http.post("/v1/completions", json={**TEXT, "model": "wide", "max_tokens": 100}),
            400,
            "max_tokens",
            "context_length_exceeded",
        )
        assert "may need 128 KV-cache positions" in error["message"] and "fewer new tokens" in error["message"]


# --- what a reply's text never holds: special tokens, half a character ----------------------------------


class _Script:
    """A sampler that forces ``picks[len(context)]`` where the context has that length: the model's choices,
    scripted (the models here are random)."""

    order = 25
    reads_context = True
    picks: ClassVar[dict[int, int]] = {}

    def __call__(self, logits, context):
        forced = self.picks.get(context.size(-1))
        if forced is None:
            return logits
        return torch.where(torch.arange(logits.size(-1)) == forced, 0.0, float("-inf")).expand_as(logits)


class _ScriptPlugin:
    @hookimpl
    def register_samplers(self, register):
        register("script", _Script)


@pytest.fixture
def script(register_plugin, monkeypatch):
    register_plugin(_ScriptPlugin(), "script-test")
    picks: dict[int, int] = {}
    monkeypatch.setattr(_Script, "picks", picks)
    return picks


def _chat_ids(chatml, messages):
    template = JinjaTemplate(CHATML, chatml.tokenizer.special_tokens)
    return encode_prompt(chatml.tokenizer, template.render(messages), bos=False)


def test_no_special_token_reaches_a_reply(client, chatml, script):
    """Found by a QA session: a chat model that opened its reply with `<|im_start|>` had it shown (the
    markers were stop strings, and a stop string counts only after some text), and a completion showed the
    special tokens the model wrote. A chat reply ends at any special token — at once, empty, when it comes
    first — and a completion's text leaves them out (its logprobs still list them, adding no text)."""
    tokenizer = chatml.tokenizer
    start = tokenizer.token_id("<|im_start|>")
    assert start in tokenizer.special_ids and start not in tokenizer.eos_ids
    messages = [{"role": "user", "content": "Who is at the door?"}]
    ids = _chat_ids(chatml, messages)
    chat = {"model": "chatml", "messages": messages, "max_tokens": 20, "seed": 1, "anexa": {"samplers": ["script"]}}
    for at in (0, 3):
        script.clear()
        script[len(ids) + at] = start
        (choice,) = post(client, "/v1/chat/completions", chat)["choices"]
        assert choice["finish_reason"] == "stop" and "<|" not in choice["message"]["content"]
        assert choice["message"]["content"] == expected(chatml, ids, at, 1, ["script"])
        streamed = events(client, "/v1/chat/completions", chat)
        assert (
            "".join(c["choices"][0]["delta"].get("content", "") for c in streamed if c["choices"])
            == (choice["message"]["content"])
        )
    script.clear()
    prompt = tokenizer.encode("Holmes said")
    script[len(prompt) + 2] = start
    body = {"model": "chatml", "prompt": prompt, "max_tokens": 6, "seed": 2, "logprobs": 0}
    body["anexa"] = {"samplers": ["script"]}
    (choice,) = post(client, "/v1/completions", body)["choices"]
    generated = _ids_scripted(chatml, prompt, 6, 2)
    assert generated[2] == start and "<|" not in choice["text"]
    assert choice["text"] == tokenizer.decode([i for i in generated if i != start])
    assert choice["logprobs"]["tokens"][2] == "<|im_start|>"
    offsets = choice["logprobs"]["text_offset"]
    assert offsets[3] == offsets[2] == len("Holmes said") + len(tokenizer.decode(generated[:2]))


def _ids_scripted(served, prompt, max_tokens, seed):
    generator = torch.Generator().manual_seed(seed)
    return list(generate_ids(served.model, prompt, max_tokens, build_chain(["script"]), generator))


def test_a_character_split_between_prompt_and_reply_comes_out_whole(client, chatml, script):
    """Found by a QA session: a prompt of token ids ending inside an emoji, and a reply whose first token
    completes it, gave the reply (and echo's text) U+FFFD, and the completing token the offset after it.
    The character is the reply's, whole; with echo the prompt's text stops before it, and all the
    character's tokens start where it does. A reply cut inside a character ends before it."""
    tokenizer = chatml.tokenizer
    ids = tokenizer.encode("Holmes 🍕")
    *prompt, last = ids
    assert tokenizer.decode(prompt).endswith("\ufffd")  # the emoji's last byte is a token of its own
    script[len(prompt)] = last
    body = {"model": "chatml", "prompt": prompt, "max_tokens": 1, "seed": 5, "anexa": {"samplers": ["script"]}}
    (alone,) = post(client, "/v1/completions", body)["choices"]
    assert alone["text"] == "🍕" and alone["finish_reason"] == "length"
    (echoed,) = post(client, "/v1/completions", {**body, "echo": True, "logprobs": 0})["choices"]
    assert echoed["text"] == "Holmes 🍕"
    emoji = [i for i, token in enumerate(echoed["logprobs"]["tokens"]) if token.startswith("\\x")]
    assert emoji and [echoed["logprobs"]["text_offset"][i] for i in emoji] == [len("Holmes ")] * len(emoji)
    script.clear()
    script[len(tokenizer.encode("Holmes "))] = ids[-2]  # the reply's only token is part of the emoji
    cut = {**body, "prompt": tokenizer.encode("Holmes "), "max_tokens": 1}
    (choice,) = post(client, "/v1/completions", cut)["choices"]
    assert choice["text"] == "" and choice["finish_reason"] == "length"
    streamed = events(client, "/v1/completions", cut)
    assert all("\ufffd" not in chunk["choices"][0]["text"] for chunk in streamed if chunk["choices"])


def test_refusals_name_what_is_wrong_with_the_value_given(client, tiny):
    """Found by a QA session: 17 stop strings were "not a valid string", an empty list of parts or of
    prompts too (pydantic's first union branch); the chat template's own stop strings escaped the bounds
    `stop` has; a prompt or a `max_completion_tokens` too large for the KV cache was blamed on
    `max_tokens`."""
    cases = [
        ({"model": "tiny", "prompt": "a", "stop": ["a"] * 17}, "stop", "at most 16"),
        ({"model": "tiny", "prompt": []}, "prompt", "at least 1"),
        ({"model": "tiny", "messages": [{"role": "user", "content": []}]}, "messages[0].content", "at least 1"),
    ]
    for body, param, words in cases:
        path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
        assert words in assert_error(client.post(path, json=body), 400, param)["message"]
    stops = {"chat_template": {"stop": ["x" * 10] * 17}}
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "anexa": stops}
    assert_error(client.post("/v1/chat/completions", json=chat), 400, "anexa.chat_template.stop")
    chat["anexa"] = {"chat_template": {"stop": ["x" * 257]}}
    assert_error(client.post("/v1/chat/completions", json=chat), 400, "anexa.chat_template.stop")
    chat["anexa"] = {"chat_template": {"stop": ["x" * 256] * 16}}
    assert post(client, "/v1/chat/completions", {**chat, "max_tokens": 2})["choices"]
    wide = _served("wide", tiny.tokenizer, block_size=256)
    small = create_app({"wide": wide}, ServeConfig(max_tokens_cap=400, max_cache_tokens=127))
    with running(small) as base, httpx.Client(base_url=base, timeout=60) as http:
        chat = {"model": "wide", "messages": [{"role": "user", "content": "Hi"}], "max_completion_tokens": 120}
        assert_error(
            http.post("/v1/chat/completions", json=chat), 400, "max_completion_tokens", "context_length_exceeded"
        )
        long = {"model": "wide", "prompt": "Holmes " * 20, "max_tokens": 1}
        error = assert_error(http.post("/v1/completions", json=long), 400, "prompt", "context_length_exceeded")
        assert "shorten the prompt" in error["message"]
