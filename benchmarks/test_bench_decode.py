"""Streaming decode of generated ids to text: the old whole-output decode (quadratic) against the tail
decode of ``anexa_core.infer.generation.decode_stream`` (linear), side by side, on BPE ids of real text.

    .venv/bin/python -m pytest benchmarks/test_bench_decode.py --benchmark-only -n0 --benchmark-group-by=param:n
"""

import pytest

from anexa_core import plugins
from anexa_core.infer.generation import decode_stream


def quadratic_stream(tokenizer, ids):
    """What streaming did before: decode everything generated so far for every new token."""
    generated, emitted = [], ""
    for token in ids:
        generated.append(token)
        text = tokenizer.decode(generated)
        if text.endswith("\ufffd"):
            continue
        if len(text) > len(emitted):
            yield text[len(emitted) :]
            emitted = text


@pytest.fixture(scope="module")
def bpe_ids():
    from anexa_core.data.corpus import load_corpus

    text, _ = load_corpus("sherlock")
    tokenizer, _ = plugins.create("tokenizers", "bpe", {"vocab_size": 1024})
    tokenizer.train([text[:200_000]])
    return tokenizer, tokenizer.encode(text)


@pytest.mark.parametrize("n", [2000, 16000])
@pytest.mark.parametrize("method", ["tail (now)", "whole output (before)"])
def test_stream_decode(benchmark, bpe_ids, n, method):
    tokenizer, ids = bpe_ids
    stream = decode_stream if method == "tail (now)" else quadratic_stream
    if method != "tail (now)" and n > 2000:
        benchmark.pedantic(lambda: "".join(stream(tokenizer, iter(ids[:n]))), rounds=1, iterations=1)
    else:
        text = benchmark(lambda: "".join(stream(tokenizer, iter(ids[:n]))))
        assert text == tokenizer.decode(ids[:n])
