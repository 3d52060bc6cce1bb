"""`anexa serve`: a real uvicorn server on 127.0.0.1, driven by raw HTTP, the `openai` package, `llm` and
a headless browser. Every expected text comes from the core's own `generate_text` with the same seed.
The API's newer parts (n, logprobs, echo, batches, refusals, Jinja chat) are in test_serve_api.py."""

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

fastapi = pytest.importorskip("fastapi", reason="anexa serve needs the serve extra: pip install -e '.[dev]'")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from helpers import assert_error, running, train_tiny_through_cli  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from anexa_cli.main import app as cli  # noqa: E402
from anexa_core.infer.chat import Transcript  # noqa: E402
from anexa_core.infer.generation import generate_text  # noqa: E402
from anexa_core.infer.sampling import build_chain  # noqa: E402
from anexa_serve import ServeConfig, create_app, load_models  # noqa: E402
from anexa_serve.server import listen  # noqa: E402

runner = CliRunner()
CAP = 20000  # long enough that an abandoned generation would visibly run on (~2000 tokens/s here)
BODY_LIMIT = 64 * 1024
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


# --- fixtures ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_dir(sherlock_path, tmp_path_factory):
    """A tiny char model trained through the CLI."""
    out = tmp_path_factory.mktemp("serve") / "tiny"
    return train_tiny_through_cli(sherlock_path, out)


@pytest.fixture(scope="module")
def models(run_dir):
    twin = run_dir.parent / "elsewhere" / "tiny"
    shutil.copytree(run_dir, twin)
    return load_models([run_dir, twin])


@pytest.fixture(scope="module")
def served(models):
    """(base URL, app) of the main server: two models, 8 rows each."""
    app = create_app(models, ServeConfig(max_tokens_cap=CAP, parallel=8, queue=8, max_body_bytes=BODY_LIMIT))
    with running(app) as url:
        yield url, app


@pytest.fixture(scope="module")
def url(served):
    return served[0]


@pytest.fixture
def client(url):
    with httpx.Client(base_url=url, timeout=30) as http:
        yield http


# --- helpers -----------------------------------------------------------------------------------------


def expected(models, prompt, max_tokens, seed, specs=(), temperature=None, stop=(), name="tiny"):
    """What the core generates alone: the text every server answer must equal."""
    served = models[name]
    chain = build_chain(list(specs), temperature)
    return "".join(generate_text(served.model, served.tokenizer, prompt, max_tokens, chain, seed, list(stop)))


def chat_prompt(*user_messages):
    return Transcript().render([{"role": "user", "content": text} for text in user_messages])


def events(response):
    """The ``data:`` payloads of a server-sent-event stream, JSON-decoded, ``[DONE]`` kept as a string."""
    out = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            out.append(data if data == "[DONE]" else json.loads(data))
        else:
            assert line == "", f"unexpected SSE line {line!r}"
    return out


def stream(client, path, body):
    with client.stream("POST", path, json={**body, "stream": True}) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        return events(response)


def streamed_text(chunks, chat):
    key = (lambda c: c["choices"][0]["delta"].get("content", "")) if chat else (lambda c: c["choices"][0]["text"])
    return "".join(key(c) for c in chunks if isinstance(c, dict) and c.get("choices"))


def wait_until(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


# --- endpoints ---------------------------------------------------------------------------------------


def test_models_are_listed_under_unique_names(client):
    body = client.get("/v1/models").json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["tiny", "tiny-2"]
    assert all(m["object"] == "model" and m["anexa"]["context_length"] == 32 for m in body["data"])
    raw = client.get("/v1/models").text + client.get("/v1/models/tiny").text
    assert "/" not in raw, "no local path leaves the machine"
    assert client.get("/v1/models/tiny-2").json()["id"] == "tiny-2"
    assert_error(client.get("/v1/models/nope"), 404, code="model_not_found")


def test_completion_equals_the_core_and_counts_usage(client, models):
    body = {"model": "tiny", "prompt": "Sherlock Holmes", "max_tokens": 40, "seed": 3, "temperature": 0.8}
    answer = client.post("/v1/completions", json=body).json()
    assert answer["object"] == "text_completion" and answer["model"] == "tiny" and answer["id"].startswith("cmpl-")
    (choice,) = answer["choices"]
    assert choice["text"] == expected(models, "Sherlock Holmes", 40, 3, temperature=0.8)
    assert choice["finish_reason"] == "length" and choice["index"] == 0
    assert answer["usage"] == {"prompt_tokens": 15, "completion_tokens": 40, "total_tokens": 55}
    assert client.post("/v1/completions", json=body).json()["choices"][0]["text"] == choice["text"]  # same seed


def test_completion_stream_is_openai_chunks(client):
    body = {"model": "tiny-2", "prompt": ["Watson"], "max_tokens": 25, "seed": 4}
    whole = client.post("/v1/completions", json=body).json()
    chunks = stream(client, "/v1/completions", {**body, "stream_options": {"include_usage": True}})
    assert chunks[-1] == "[DONE]"
    *pieces, final, usage, _ = chunks
    assert all(c["object"] == "text_completion" and c["id"] == final["id"] for c in pieces)
    assert all(c["choices"][0]["finish_reason"] is None and c["choices"][0]["text"] for c in pieces)
    assert final["choices"][0]["finish_reason"] == "length" and final["choices"][0]["text"] == ""
    assert usage["choices"] == [] and usage["usage"] == whole["usage"]
    assert streamed_text(chunks, chat=False) == whole["choices"][0]["text"]
    plain = stream(client, "/v1/completions", body)  # no stream_options: no usage chunk
    assert all("usage" not in c for c in plain[:-1]) and plain[-1] == "[DONE]"


def test_chat_uses_the_template_streaming_and_not(client, models):
    messages = [
        {"role": "system", "content": "A story."},
        {"role": "user", "content": "Holmes"},
        {"role": "assistant", "content": "Yes?"},
        {"role": "user", "content": [{"type": "text", "text": "Go on"}]},
    ]
    prompt = "A story.\n\nUser: Holmes\nAssistant: Yes?\nUser: Go on\nAssistant:"
    body = {"model": "tiny", "messages": messages, "max_tokens": 30, "seed": 11}
    want = expected(models, prompt, 30, 11, stop=Transcript().stop)
    answer = client.post("/v1/chat/completions", json=body).json()
    assert answer["object"] == "chat.completion" and answer["id"].startswith("chatcmpl-")
    assert answer["choices"][0]["message"] == {"role": "assistant", "content": want}
    assert answer["usage"]["prompt_tokens"] == 32  # the 57-character prompt, cropped to the context
    chunks = stream(client, "/v1/chat/completions", {**body, "stream_options": {"include_usage": True}})
    assert chunks[0]["object"] == "chat.completion.chunk"
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert streamed_text(chunks, chat=True) == want
    assert chunks[-3]["choices"][0]["delta"] == {} and chunks[-3]["choices"][0]["finish_reason"] in ("stop", "length")
    assert chunks[-2]["usage"] == answer["usage"]


def test_chat_template_is_overridable_per_request(client, models):
    template = {"user": "Q: {content}\n", "generation_prompt": "A:", "stop": ["\nQ:"]}
    body = {
        "messages": [{"role": "user", "content": "Who?"}],
        "model": "tiny",
        "max_tokens": 20,
        "seed": 2,
        "anexa": {"chat_template": template},
    }
    answer = client.post("/v1/chat/completions", json=body).json()
    assert answer["choices"][0]["message"]["content"] == expected(models, "Q: Who?\nA:", 20, 2, stop=["\nQ:"])
    assert answer["usage"]["prompt_tokens"] == len("Q: Who?\nA:")
    body["anexa"]["chat_template"]["user"] = "Q→ {content}\n"  # a character the model never saw
    error = assert_error(client.post("/v1/chat/completions", json=body), 400, "messages", "unencodable_prompt")
    assert "'→'" in error["message"] and "chat template" in error["message"]
    body["messages"][0]["content"] = "日"  # now the user's own text is to blame: no template hint
    assert "chat template" not in client.post("/v1/chat/completions", json=body).json()["error"]["message"]


def test_stop_strings_and_usage_count_generated_tokens(client):
    body = {"model": "tiny", "prompt": "The ", "max_tokens": 60, "seed": 5}
    free = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    stop = free[20:22]
    cut = free.index(stop)
    for streaming in (False, True):
        request = {**body, "stop": [stop, "never-there"]}
        if streaming:
            chunks = stream(client, "/v1/completions", {**request, "stream_options": {"include_usage": True}})
            text, finish, usage = (
                streamed_text(chunks, False),
                chunks[-3]["choices"][0]["finish_reason"],
                chunks[-2]["usage"],
            )
        else:
            answer = client.post("/v1/completions", json=request).json()
            text, finish, usage = answer["choices"][0]["text"], answer["choices"][0]["finish_reason"], answer["usage"]
        assert text == free[:cut] and finish == "stop"
        # one token per character: the text before the stop, then the stop string's own tokens
        assert usage == {"prompt_tokens": 4, "completion_tokens": cut + len(stop), "total_tokens": 4 + cut + len(stop)}


def test_samplers_extension_and_top_p_map_onto_cli_specs(client, models):
    specs = ["top_k=5", "repetition_penalty=1.3"]
    body = {"model": "tiny", "prompt": "Baker Street", "max_tokens": 30, "seed": 9, "anexa": {"samplers": specs}}
    assert client.post("/v1/completions", json=body).json()["choices"][0]["text"] == expected(
        models, "Baker Street", 30, 9, specs
    )
    body = {"model": "tiny", "prompt": "Baker Street", "max_tokens": 30, "seed": 9, "top_p": 0.5, "temperature": 0.7}
    assert client.post("/v1/completions", json=body).json()["choices"][0]["text"] == expected(
        models, "Baker Street", 30, 9, ["top_p=0.5"], temperature=0.7
    )


# --- under load --------------------------------------------------------------------------------------


def test_eight_concurrent_streams_each_get_their_solo_text(served, models):
    url, app = served
    bodies = [
        {
            "model": ["tiny", "tiny-2"][i % 2],
            "prompt": f"Holmes {i}",
            "max_tokens": 120,
            "seed": 100 + i,
            "temperature": 0.9,
            "anexa": {"samplers": ["top_p=0.95"]},
        }
        for i in range(8)
    ]

    def one(body):
        with httpx.Client(base_url=url, timeout=60) as http:
            return streamed_text(stream(http, "/v1/completions", body), chat=False)

    solo = [one(body) for body in bodies]
    assert solo[0] == expected(models, "Holmes 0", 120, 100, ["top_p=0.95"], temperature=0.9)
    assert len(set(solo)) == 8
    decoders = app.state.server.decoders.values()
    for decoder in decoders:
        decoder.stats.peak_rows = 0
    steps, tokens = (sum(getattr(d.stats, name) for d in decoders) for name in ("steps", "tokens_generated"))
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(one, bodies))
    assert together == solo
    # Four per model, decoded as rows of one batch: far fewer forward passes than tokens.
    assert all(decoder.stats.peak_rows >= 2 for decoder in decoders)
    new_steps = sum(d.stats.steps for d in decoders) - steps
    assert new_steps < 0.75 * (sum(d.stats.tokens_generated for d in decoders) - tokens)


def test_client_disconnect_stops_its_generation(served):
    url, app = served
    decoder = app.state.server.decoders["tiny"]
    stats = decoder.stats
    before_tokens, before_cancelled = stats.tokens_generated, stats.requests_cancelled
    body = {"model": "tiny", "prompt": "Holmes", "max_tokens": CAP, "stream": True}
    with httpx.Client(base_url=url, timeout=30) as http, http.stream("POST", "/v1/completions", json=body) as response:
        for index, _ in enumerate(response.iter_lines()):
            if index > 10:
                break
    wait_until(lambda: decoder.held == 0 and stats.requests_cancelled == before_cancelled + 1)
    generated = stats.tokens_generated - before_tokens
    time.sleep(0.3)
    assert stats.tokens_generated - before_tokens == generated < CAP // 4  # stopped, far short of max_tokens
    # A non-streaming client that gives up stops its generation too.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "Holmes", "max_tokens": CAP}, timeout=0.5)
    wait_until(lambda: decoder.held == 0 and stats.requests_cancelled == before_cancelled + 2)
    assert stats.tokens_generated - before_tokens < CAP // 2


def test_requests_beyond_the_queue_get_429(models):
    app = create_app(models, ServeConfig(max_tokens_cap=CAP, parallel=1, queue=1))
    long = {"model": "tiny", "prompt": "Holmes", "max_tokens": CAP, "stream": True}
    with (
        running(app) as url,
        httpx.Client(base_url=url, timeout=30) as first,
        httpx.Client(base_url=url, timeout=30) as second,
        httpx.Client(base_url=url, timeout=30) as third,
    ):
        with first.stream("POST", "/v1/completions", json=long) as running_one:
            lines = running_one.iter_lines()  # kept: a dropped iterator would close the connection
            assert next(lines).startswith("data: ")  # generating
            decoder = app.state.server.decoders["tiny"]
            two = third.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 1, "n": 2})
            message = assert_error(two, 429, code="queue_full")["message"]  # its first choice got the last place
            assert "1 rows decoding and 0 requests waiting, with room for 2" in message, "not counting its own"
            wait_until(lambda: decoder.waiting == 0)  # that choice was cancelled, and has left the line
            with second.stream("POST", "/v1/completions", json=long) as queued:
                assert queued.status_code == 200  # admitted: waits for the row
                refused = third.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 1})
                error = assert_error(refused, 429, code="queue_full")
                assert error["type"] == "rate_limit_error" and refused.headers["retry-after"] == "1"
                assert decoder.running == 1 and decoder.waiting == 1
                running_one.close()  # frees the row: the queued request starts
                assert next(queued.iter_lines()).startswith("data: ")
        wait_until(lambda: app.state.server.decoders["tiny"].held == 0)
        ok = third.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 3})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3


# --- bad input ---------------------------------------------------------------------------------------

BAD = {
    "malformed JSON": ("/v1/completions", b'{"prompt": "x",', 400, None, "invalid_json"),
    "not an object": ("/v1/completions", b'["x"]', 400, None, "invalid_json"),
    "deeply nested": ("/v1/completions", b"[" * 20000 + b"]" * 20000, 400, None, "invalid_json"),
    # Found by a QA session: a field given twice kept its last value without a word.
    "field twice": (
        "/v1/completions",
        b'{"model": "tiny", "prompt": "x", "max_tokens": 5, "max_tokens": 6}',
        400,
        "max_tokens",
        None,
    ),
    "nested field twice": (
        "/v1/chat/completions",
        b'{"model": "tiny", "messages": [{"role": "user", "content": "a", "content": "b"}]}',
        400,
        "content",
        None,
    ),
    "unknown model": ("/v1/completions", {"model": "gpt-4", "prompt": "x"}, 404, "model", "model_not_found"),
    "model missing": ("/v1/completions", {"prompt": "x"}, 400, "model", None),
    "prompt missing": ("/v1/completions", {"model": "tiny"}, 400, "prompt", None),
    "unseen characters": ("/v1/completions", {"model": "tiny", "prompt": "日本"}, 400, "prompt", "unencodable_prompt"),
    "unseen in chat": (
        "/v1/chat/completions",
        {"model": "tiny", "messages": [{"role": "user", "content": "日本"}]},
        400,
        "messages",
        "unencodable_prompt",
    ),
    "empty prompt": ("/v1/completions", {"model": "tiny", "prompt": ""}, 400, "prompt", None),
    "max_tokens over cap": (
        "/v1/completions",
        {"model": "tiny", "prompt": "x", "max_tokens": CAP + 1},
        400,
        "max_tokens",
        "max_tokens_over_cap",
    ),
    "max_tokens negative": (
        "/v1/completions",
        {"model": "tiny", "prompt": "x", "max_tokens": -5},
        400,
        "max_tokens",
        None,
    ),
    "max_tokens zero": ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 0}, 400, "max_tokens", None),
    "max_tokens text": (
        "/v1/completions",
        {"model": "tiny", "prompt": "x", "max_tokens": "5"},
        400,
        "max_tokens",
        None,
    ),
    "oversized body": (
        "/v1/completions",
        {"model": "tiny", "prompt": "a" * (BODY_LIMIT + 1)},
        413,
        None,
        "body_too_large",
    ),
    "unknown sampler": (
        "/v1/completions",
        {"model": "tiny", "prompt": "x", "anexa": {"samplers": ["nucleus=1"]}},
        400,
        "anexa.samplers",
        "invalid_sampler",
    ),
    "bad sampler value": ("/v1/completions", {"model": "tiny", "prompt": "x", "top_p": 2.0}, 400, "top_p", None),
    "negative temperature": (
        "/v1/completions",
        {"model": "tiny", "prompt": "x", "temperature": -1.0},
        400,
        "temperature",
        "invalid_sampler",
    ),
    "temperature twice": (
        "/v1/completions",
        {"model": "tiny", "prompt": "x", "temperature": 0.5, "anexa": {"samplers": ["temperature=1"]}},
        400,
        "temperature",
        None,
    ),
    "unknown anexa option": (
        "/v1/completions",
        {"model": "tiny", "prompt": "x", "anexa": {"sampler": []}},
        400,
        "anexa.sampler",
        None,
    ),
    "seed out of range": ("/v1/completions", {"model": "tiny", "prompt": "x", "seed": 2**70}, 400, "seed", None),
    "empty stop": ("/v1/completions", {"model": "tiny", "prompt": "x", "stop": [""]}, 400, "stop[0]", None),
    "no messages": ("/v1/chat/completions", {"model": "tiny", "messages": []}, 400, "messages", None),
    "unknown role": (
        "/v1/chat/completions",
        {"model": "tiny", "messages": [{"role": "tool", "content": "x"}]},
        400,
        "messages[0].role",
        None,
    ),
    "bad template": (
        "/v1/chat/completions",
        {
            "model": "tiny",
            "messages": [{"role": "user", "content": "x"}],
            "anexa": {"chat_template": {"user": "no placeholder"}},
        },
        400,
        "anexa.chat_template",
        None,
    ),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_gets_an_openai_error_and_the_server_keeps_serving(client, case):
    path, body, status, param, code = BAD[case]
    if isinstance(body, bytes):
        response = client.post(path, content=body, headers={"content-type": "application/json"})
    else:
        response = client.post(path, json=body)
    assert_error(response, status, param, code)
    for stream_it in (False, True):  # the same refusal, before any event, when streaming is asked for
        if isinstance(body, dict) and status != 413:
            assert_error(client.post(path, json={**body, "stream": stream_it}), status, param, code)
    ok = client.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2})
    assert ok.status_code == 200 and len(ok.json()["choices"][0]["text"]) == 2


def test_routes_methods_and_hosts_are_refused_as_json(client):
    assert_error(client.get("/v2/anything"), 404, code="not_found")
    assert_error(client.get("/v1/completions"), 405, code="method_not_allowed")
    assert_error(client.get("/v1/models", headers={"host": "attacker.example:80"}), 400, code="invalid_host")
    for path in ("/", "/health"):  # `curl -I` and link checkers ask with HEAD: headers, no body
        head = client.head(path)
        assert head.status_code == 200 and head.content == b"" and head.headers["content-type"], path
    for host in ("localhost:1234", "LOCALHOST", "[::1]", "[::1]:8000", "127.0.0.1:65535"):
        assert client.get("/v1/models", headers={"host": host}).status_code == 200, host
    # A loopback name with something around it is not a loopback name (found by an adversarial probe).
    for host in ("[::1].evil.com", "[::1]evil", "127.0.0.1:8765, evil.com", "localhost@evil.com", "localhost:80:80"):
        assert_error(client.get("/v1/models", headers={"host": host}), 400, code="invalid_host")


def test_no_web_page_of_another_origin_can_make_the_server_generate(client, url):
    """A page the user visits may POST a "simple" request (text/plain, no preflight) to a server on their
    machine; the browser marks it with ``Origin``. Only this server's own origin (its chat page) passes;
    clients that are not browsers send none."""
    body = '{"model": "tiny", "prompt": "x", "max_tokens": 2}'
    plain = {"content-type": "text/plain"}
    host = url.split("://")[1]
    port = int(host.rsplit(":", 1)[1])
    for origin in ("http://evil.example", "null", f"http://127.0.0.1:{port + 1}", f"http://{host}.evil.example"):
        refused = client.post("/v1/completions", content=body, headers={**plain, "origin": origin})
        assert assert_error(refused, 403, code="cross_origin")["type"] == "permission_error", origin
    for headers in ({"origin": url}, {"origin": url.upper()}, {}):
        assert client.post("/v1/completions", content=body, headers={**plain, **headers}).status_code == 200


def test_a_client_gone_while_sending_its_body_is_no_server_error(url, caplog):
    import socket

    host, port = url.split("://")[1].rsplit(":", 1)
    with socket.create_connection((host, int(port))) as sock:
        head = f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        sock.sendall((head + 'Content-Length: 1000\r\n\r\n{"model": "tiny"').encode())
    with caplog.at_level(logging.INFO):
        wait_until(lambda: httpx.get(f"{url}/health").status_code == 200)
        time.sleep(0.3)  # the server notices the closed connection
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


def test_api_key_is_required_when_set(models):
    app = create_app(models, ServeConfig(api_key="s3cret"))
    with running(app) as url, httpx.Client(base_url=url) as http:
        assert assert_error(http.get("/v1/models"), 401, code="invalid_api_key")["type"] == "authentication_error"
        assert_error(http.get("/v1/models", headers={"authorization": "Bearer wrong"}), 401)
        assert_error(http.post("/v1/completions", json={"model": "tiny", "prompt": "x"}), 401)
        assert http.get("/v1/models", headers={"authorization": "Bearer s3cret"}).status_code == 200
        assert http.get("/").status_code == 200  # the page itself is static; it sends the key it is given


# --- real clients ------------------------------------------------------------------------------------


def test_the_openai_package_streaming_and_not(url, models):
    openai = pytest.importorskip("openai")
    api = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in api.models.list()] == ["tiny", "tiny-2"]
    want = expected(models, "Sherlock", 30, 21, ["top_k=8"])
    extra = {"anexa": {"samplers": ["top_k=8"]}}
    answer = api.completions.create(model="tiny", prompt="Sherlock", max_tokens=30, seed=21, extra_body=extra)
    assert answer.choices[0].text == want and answer.usage.completion_tokens == 30
    pieces = api.completions.create(
        model="tiny", prompt="Sherlock", max_tokens=30, seed=21, extra_body=extra, stream=True
    )
    assert "".join(chunk.choices[0].text for chunk in pieces) == want

    messages = [{"role": "user", "content": "Watson"}]
    chat_want = expected(models, chat_prompt("Watson"), 30, 8, stop=Transcript().stop)
    reply = api.chat.completions.create(model="tiny-2", messages=messages, max_tokens=30, seed=8)
    assert reply.choices[0].message.content == chat_want and reply.usage.prompt_tokens == len(chat_prompt("Watson"))
    chunks = list(
        api.chat.completions.create(
            model="tiny-2",
            messages=messages,
            max_tokens=30,
            seed=8,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat_want
    assert chunks[-1].usage.total_tokens == reply.usage.total_tokens

    with pytest.raises(openai.NotFoundError):
        api.completions.create(model="nope", prompt="x")
    with pytest.raises(openai.BadRequestError, match="never seen in training"):
        api.completions.create(model="tiny", prompt="日本")


def test_llm_cli_through_its_openai_compatible_model_file(url, models, tmp_path):
    pytest.importorskip("llm")
    (tmp_path / "extra-openai-models.yaml").write_text(
        f"- model_id: anexa-chat\n  model_name: tiny\n  api_base: {url}/v1\n"
        f"- model_id: anexa-text\n  model_name: tiny-2\n  api_base: {url}/v1\n  completion: true\n"
    )
    env = {**os.environ, "LLM_USER_PATH": str(tmp_path)}
    env.pop("OPENAI_API_KEY", None)

    def llm(*args):
        done = subprocess.run([sys.executable, "-m", "llm", *args], env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout

    options = ["-o", "seed", "13", "-o", "max_tokens", "25"]
    chat_want = expected(models, chat_prompt("Holmes"), 25, 13, stop=Transcript().stop)
    assert llm("-m", "anexa-chat", *options, "Holmes") == chat_want + "\n"
    text_want = expected(models, "Holmes", 25, 13, name="tiny-2")
    assert llm("-m", "anexa-text", *options, "--no-stream", "Holmes") == text_want + "\n"


def test_chat_page_in_a_real_browser(url, models, tmp_path):
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip("no browser: apt-get install chromium chromium-driver (.ci/run does) to run the page test")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path / 'profile'}",
    ):
        options.add_argument(flag)
    try:
        browser = webdriver.Chrome(options=options, service=webdriver.ChromeService(str(CHROMEDRIVER)))
    except Exception as exc:  # a broken local install must say so, not fail the suite
        pytest.skip(f"chromium did not start: {str(exc).splitlines()[0]}")
    waiter = WebDriverWait(browser, 20, poll_frequency=0.02)
    last_answer = "#log .assistant:last-child"

    def wait(condition):
        """Wait for ``condition(browser)``; on a timeout, fail showing what the page shows."""
        try:
            return waiter.until(condition)
        except TimeoutException:
            shown = {
                name: browser.find_element(By.ID, name).get_property("textContent")[-300:]
                for name in ("error", "status", "log")
            }
            pytest.fail(f"the page did not get there: {shown}")

    try:
        browser.get(url + "/")
        wait(lambda b: b.find_element(By.ID, "model").get_attribute("data-loaded") == "true")
        assert [o.text for o in browser.find_elements(By.CSS_SELECTOR, "#model option")] == ["tiny", "tiny-2"]

        def placeholders():
            return [
                browser.find_element(By.ID, name).get_attribute("placeholder") for name in ("temperature", "samplers")
            ]

        assert placeholders() == ["1.0", "top_k=40, repetition_penalty=1.2"]  # /v1/models: no recommendation
        choose = (
            'const s = document.getElementById("model"); s.value = arguments[0]; s.dispatchEvent(new Event("change"));'
        )
        browser.execute_script('document.querySelector("#model option[value=tiny-2]").dataset.sampling = "top_p=0.7";')
        browser.execute_script(choose, "tiny-2")  # a model whose makers recommend a sampling, as /v1/models says
        assert placeholders() == ["model's", "model's: top_p=0.7"]
        browser.execute_script(choose, "tiny")
        assert placeholders() == ["1.0", "top_k=40, repetition_penalty=1.2"]
        for field, value in (("seed", "17"), ("max-tokens", "40")):
            browser.find_element(By.ID, field).clear()
            browser.find_element(By.ID, field).send_keys(value)
        browser.find_element(By.ID, "prompt").send_keys("Sherlock Holmes")
        browser.find_element(By.ID, "send").click()
        wait(lambda b: b.find_element(By.CSS_SELECTOR, last_answer).get_attribute("data-done") == "true")
        answer = browser.find_element(By.CSS_SELECTOR, last_answer).get_property("textContent")
        assert answer == expected(models, chat_prompt("Sherlock Holmes"), 40, 17, stop=Transcript().stop)
        assert "generated" in browser.find_element(By.ID, "status").text

        # A long completion streams in piece by piece; Stop ends it (the server stops generating).
        browser.find_element(By.ID, "mode").send_keys("completion")
        browser.find_element(By.ID, "max-tokens").clear()
        browser.find_element(By.ID, "max-tokens").send_keys(str(CAP))
        browser.find_element(By.ID, "prompt").send_keys("Watson")
        browser.find_element(By.ID, "send").click()
        wait(lambda b: len(b.find_element(By.CSS_SELECTOR, last_answer).get_property("textContent")) > 20)
        assert browser.find_element(By.CSS_SELECTOR, last_answer).get_attribute("data-done") != "true"  # mid-stream
        browser.find_element(By.ID, "stop-button").click()
        wait(lambda b: b.find_element(By.ID, "status").text == "stopped")
        assert len(browser.find_element(By.CSS_SELECTOR, last_answer).get_property("textContent")) < CAP

        # Errors are shown, not swallowed.
        browser.find_element(By.ID, "prompt").send_keys("日本")
        browser.find_element(By.ID, "send").click()
        wait(lambda b: "never seen in training" in b.find_element(By.ID, "error").text)
        assert browser.find_element(By.ID, "prompt").get_property("value") == "日本"  # given back to edit
    finally:
        browser.quit()


# --- the command -------------------------------------------------------------------------------------


def test_serve_command_errors_are_one_line(tmp_path):
    result = runner.invoke(cli, ["serve", "--model", str(tmp_path / "missing"), "--host", "0.0.0.0", "--port", "0"])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("warning: --host 0.0.0.0 is not a loopback address")
    assert len(lines) == 2 and lines[1].startswith("error: no checkpoint at")
    (tmp_path / "t.toml").write_text('user = "no placeholder"\n')
    result = runner.invoke(cli, ["serve", "--chat-template", str(tmp_path / "t.toml")])
    assert result.exit_code == 2 and result.stderr.startswith("error: chat template 'user' must be text containing")
    (tmp_path / "t.jinja").write_text("{% for m in messages %}{{ m.content }")
    result = runner.invoke(cli, ["serve", "--chat-template", str(tmp_path / "t.jinja")])
    assert result.exit_code == 2 and result.stderr.startswith(
        f"error: chat template {tmp_path / 't.jinja'} does not parse"
    )
    assert len(result.stderr.strip().splitlines()) == 1
    for key in ("ключ-é", "two words", "tab\tkey"):  # a header carries printable ASCII only: nobody could log in
        result = runner.invoke(cli, ["serve", "--model", str(tmp_path / "missing"), "--api-key", key, "--port", "0"])
        assert result.exit_code == 2 and result.stderr.startswith("error: --api-key (or ANEXA_API_KEY) holds a space")
    result = runner.invoke(cli, ["serve", "-m", str(tmp_path / "missing"), "--api-key", "s3cr3t-K~ey!", "--port", "0"])
    assert result.exit_code == 2 and result.stderr.startswith("error: no checkpoint at"), "the key itself is fine"
    # Found by a QA session: click reads an empty variable as unset, so ANEXA_API_KEY= served without a key.
    for value in ("", " "):
        result = runner.invoke(
            cli, ["serve", "-m", str(tmp_path / "missing"), "--port", "0"], env={"ANEXA_API_KEY": value}
        )
        assert result.exit_code == 2 and result.stderr.startswith("error: --api-key (or ANEXA_API_KEY) is empty"), value
    # Found by a QA session: the same run given twice was served twice, as `run` and `run-2`.
    twice = ["serve", "-m", str(tmp_path / "missing"), "-m", str(tmp_path / "sub" / ".." / "missing"), "--port", "0"]
    result = runner.invoke(cli, twice)
    assert result.exit_code == 2 and result.stderr == (
        f"error: --model {tmp_path / 'sub' / '..' / 'missing'} is given twice: serve each model once\n"
    )
    result = runner.invoke(
        cli, ["serve", "-m", str(tmp_path / "missing"), "-m", str(tmp_path / "other"), "--port", "0"]
    )
    assert result.exit_code == 2 and result.stderr.startswith("error: no checkpoint at"), "two models"
    result = runner.invoke(cli, ["serve", "-m", str(tmp_path / "missing"), "--port", "0"], env={"ANEXA_API_KEY": None})
    assert result.exit_code == 2 and result.stderr.startswith("error: no checkpoint at"), "no variable: no key"
    # Found by a QA session: a default above the cap was cut to the cap without a word. A lower cap alone
    # still lowers the default (the cap holds every request).
    above = ["serve", "-m", str(tmp_path / "missing"), "--default-max-tokens", "5000", "--port", "0"]
    result = runner.invoke(cli, above)
    assert result.exit_code == 2 and result.stderr == (
        "error: --default-max-tokens 5000 is above --max-tokens-cap 1024, which every request is held to: lower "
        "it or raise the cap\n"
    )
    for flags in (["--default-max-tokens", "1024"], ["--max-tokens-cap", "50"]):
        result = runner.invoke(cli, ["serve", "-m", str(tmp_path / "missing"), *flags, "--port", "0"])
        assert result.exit_code == 2 and result.stderr.startswith("error: no checkpoint at"), flags


def test_serve_refuses_a_cache_budget_that_fits_no_request(run_dir):
    result = runner.invoke(cli, ["serve", "--model", str(run_dir), "--max-cache-tokens", "31", "--port", "0"])
    assert result.exit_code == 2, result.output
    assert result.stderr.strip() == (
        "error: a KV-cache budget of 31 positions fits no request: the smallest cache holds 32 (the context or "
        "64); give at least 32"
    )


def test_serve_command_runs_a_server_with_an_api_key_from_the_environment(run_dir):
    env = {**os.environ, "ANEXA_API_KEY": "k3y", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "anexa_cli", "serve", "--model", str(run_dir), "--port", "0"],
        env=env,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    try:
        line = process.stderr.readline()
        assert line.startswith("serving tiny on http://127.0.0.1:"), line
        base = line.split(" on ")[1].split()[0]
        wait_until(lambda: httpx.get(f"{base}/health").status_code == 200)
        assert httpx.get(f"{base}/v1/models").status_code == 401
        listed = httpx.get(f"{base}/v1/models", headers={"authorization": "Bearer k3y"})
        assert [m["id"] for m in listed.json()["data"]] == ["tiny"]
    finally:
        process.terminate()
        process.wait(10)


def test_accepted_connections_do_not_wait_for_delayed_acks():
    """Nagle's algorithm would hold each streamed token ~40 ms for the client's delayed ACK."""
    import asyncio
    import socket

    async def check():
        seen = asyncio.get_running_loop().create_future()

        async def handle(reader, writer):
            seen.set_result(writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(handle, sock=listen("127.0.0.1", 0))
        port = server.sockets[0].getsockname()[1]
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        nodelay = await asyncio.wait_for(seen, 5)
        writer.close()
        server.close()
        return nodelay

    assert asyncio.run(check()) == 1
