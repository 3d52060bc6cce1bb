"""lm-evaluation-harness against `anexa serve`: a perplexity task over a local text gives what `anexa eval` gives.

`lm_eval --model local-completions` runs as a subprocess (its own environment: offline, its caches in
tmp_path) against a real `anexa serve` of a small trained run. It counts tokens with the server's own
tokenizer through the vLLM-style routes `/tokenizer_info`, `/tokenize` and `/detokenize`
(`tokenizer_backend=remote`) and sends token ids (`tokenized_requests=True`), so nothing is fetched from
the Hugging Face hub and no foreign tokenizer is involved; each loglikelihood request is the shape the
server must answer: `prompt` a list of token-id lists, `echo: true`, `logprobs: 1`, `max_tokens: 1`.
"""

import json
import math
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("fastapi", reason="anexa serve needs the serve extra: pip install -e '.[dev]'")
pytest.importorskip("lm_eval", reason="needs lm-evaluation-harness: pip install 'lm-eval[api]'")
httpx = pytest.importorskip("httpx")

from typer.testing import CliRunner  # noqa: E402

from anexa_cli.main import app as cli  # noqa: E402
from anexa_core.infer.evaluation import evaluate_text  # noqa: E402
from anexa_core.io.load import load  # noqa: E402

BLOCK = 32
TASK = """\
task: anexa_local_text
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: loglikelihood_rolling
test_split: test
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
metadata:
  version: 1.0
"""


def _ascii_passage(book: str, most: int = 2400) -> str:
    """The longest stretch of the book without non-ASCII characters (its curly quotes), at most ``most``
    characters: one byte per character, so bits per byte are bits per character."""
    best, start = (0, 0), 0
    for index, char in enumerate(book + "\x80"):
        if ord(char) >= 128:
            best = max(best, (index - start, start))
            start = index + 1
    length, begin = best
    return book[begin : begin + min(length, most)]


@pytest.fixture(scope="module")
def run_dir(sherlock_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("lm-eval") / "tiny"
    args = ["train", "--data", str(sherlock_path), "--n-layer", "1", "--n-head", "2", "--n-embd", "32"]
    args += ["--block-size", str(BLOCK), "--batch-size", "8", "--steps", "30", "--eval-every", "30"]
    result = CliRunner().invoke(cli, [*args, "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture
def server(run_dir):
    """``anexa serve`` of the run on a free port: its base URL."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "anexa_cli", "serve", "--model", str(run_dir), "--port", "0", "--threads", "1"]
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    try:
        line = process.stderr.readline()
        assert line.startswith("serving tiny on http://127.0.0.1:"), line
        yield line.split(" on ")[1].split()[0]
    finally:
        process.terminate()
        process.wait(10)


def _task(tmp_path, passage: str) -> None:
    """The passage for `anexa eval` and, without its first character (lm-eval's prefix token), as the
    document of a local lm-eval task."""
    (tmp_path / "passage.txt").write_text(passage, encoding="utf-8")
    (tmp_path / "doc.jsonl").write_text(json.dumps({"text": passage[1:]}) + "\n", encoding="utf-8")
    (tmp_path / "task").mkdir()
    (tmp_path / "task" / "local_text.yaml").write_text(TASK.format(data=tmp_path / "doc.jsonl"), encoding="utf-8")


def _lm_eval(tmp_path, model: str, model_args: list[str]) -> dict:
    """`lm_eval run` offline (its caches in tmp_path) on the local task: its scores."""
    hub_off = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env = {**os.environ, **hub_off, "HF_HOME": str(tmp_path / "hf"), "OPENAI_API_KEY": "unused"}
    command = [sys.executable, "-m", "lm_eval", "run", "--model", model, "--tasks", "anexa_local_text"]
    command += ["--model_args", ",".join(model_args), "--include_path", str(tmp_path / "task")]
    command += ["--batch_size", "4", "--output_path", str(tmp_path / "out")]  # 4 windows a request: rows of a batch
    done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (results_file,) = (tmp_path / "out").rglob("results_*.json")
    return json.loads(results_file.read_text())["results"]["anexa_local_text"]


def _agrees_with_anexa_eval(scores: dict, run_dir, tmp_path, passage: str) -> None:
    """lm-eval's bits per byte, byte and word perplexity equal `anexa eval --stride L`'s (to 1e-4)."""
    loaded = load(run_dir, "cpu")
    result, _ = evaluate_text(loaded.model, loaded.tokenizer, loaded.meta, str(tmp_path / "passage.txt"), stride=BLOCK)
    assert (result.window, result.characters) == (BLOCK, len(passage) - 1)
    assert scores["bits_per_byte,none"] == pytest.approx(result.bits_per_char, rel=1e-4)
    assert scores["byte_perplexity,none"] == pytest.approx(result.perplexity, rel=1e-4)  # one token per byte
    words = len(re.split(r"\s+", passage[1:]))  # lm-eval's own count
    assert scores["word_perplexity,none"] == pytest.approx(math.exp(result.nats / words), rel=1e-4)


@pytest.mark.slow
def test_lm_eval_perplexity_through_the_server_equals_anexa_eval(server, run_dir, sherlock_path, tmp_path):
    """`lm_eval`'s `loglikelihood_rolling` scores the document in disjoint windows of `max_seq_len =
    max_length - 2` predictions (its `max_length - 1` input tokens, less one for the continuation). The first
    window predicts the first `max_seq_len` tokens after a prefix token; each later one predicts the next
    `max_seq_len` tokens from the one token before them, and the last one is moved back so that it too is
    full. `anexa eval --stride L` (L = the model's context) windows the text exactly so when its first token
    is lm-eval's prefix token: window w reads tokens wL … wL+L-1 and scores the L tokens after its first.
    So lm-eval gets the text without its first character, `custom_prefix_token_id` = that character's id
    and `max_length = L + 2`: each request is L + 1 token ids, which the server scores whole (the last from
    the L before it). Both sum the same log-probabilities, over the same characters (all ASCII: one byte
    each): the issue asks for 1%, they agree to float rounding, so the test holds them to 1e-4 (windows
    one token shorter move the sum by more)."""
    passage = _ascii_passage(sherlock_path.read_text(encoding="utf-8"))
    assert len(passage) > 1500
    _task(tmp_path, passage)
    prefix = httpx.post(f"{server}/tokenize", json={"prompt": passage[0]}).json()["tokens"]
    model_args = [
        "model=tiny",
        f"base_url={server}/v1/completions",
        "tokenizer_backend=remote",
        "tokenized_requests=True",
        f"max_length={BLOCK + 2}",
        f"custom_prefix_token_id={prefix[0]}",
    ]
    _agrees_with_anexa_eval(_lm_eval(tmp_path, "local-completions", model_args), run_dir, tmp_path, passage)


@pytest.mark.slow
def test_lm_eval_on_the_transformers_export_equals_anexa_eval(run_dir, sherlock_path, tmp_path):
    """`lm_eval --model hf` on `anexa export` of the same run: transformers' windows of `max_length = L`
    predictions (the first after the prefix token, each later one from the token before) are `anexa eval
    --stride L`'s again. Anexa's own tokenizers have no special tokens, and the export says so (no BOS or
    EOS id): lm-eval then needs `prefix_token_id` — the passage's first character, as through the server."""
    passage = _ascii_passage(sherlock_path.read_text(encoding="utf-8"))
    _task(tmp_path, passage)
    exported = CliRunner().invoke(cli, ["export", str(run_dir), str(tmp_path / "hf")])
    assert exported.exit_code == 0, exported.output
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["bos_token_id"] is None and config["eos_token_id"] is None
    prefix = load(run_dir, "cpu").tokenizer.encode(passage[0])
    model_args = [
        f"pretrained={tmp_path / 'hf'}",
        f"max_length={BLOCK}",
        f"prefix_token_id={prefix[0]}",
        "dtype=float32",
    ]
    _agrees_with_anexa_eval(_lm_eval(tmp_path, "hf", model_args), run_dir, tmp_path, passage)
