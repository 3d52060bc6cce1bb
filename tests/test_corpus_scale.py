"""Data at scale: folders and several files, streaming reads, the token cache (reuse, invalidation, damage),
memory-mapped batches, and bad inputs through the CLI."""

import json
import logging
import lzma

import numpy as np
import pytest
import torch
from helpers import user_error
from typer.testing import CliRunner

from anexa_cli.main import app
from anexa_core import AnexaError, hookimpl, plugins
from anexa_core.config import ModelConfig, TrainConfig, resolve
from anexa_core.data import corpus as data
from anexa_core.data import tokens
from anexa_core.data.corpus import (
    Collection,
    LocalText,
    corpus_pieces,
    iter_text,
    load_corpus,
    read_corpus,
    resolve_corpus,
)
from anexa_core.data.prepare import prepare_data
from anexa_core.train.loop import train
from anexa_core.train.resume import resume_configs
from anexa_core.train.step import get_batch

runner = CliRunner()
BLOCK = 16
LINES = [
    "It was a bright cold day in April.",
    "The clocks were striking thirteen.",
    "Winston Smith hurried home.",
    "  An indented line, then a blank one:",
    "",
    "Ünïcödé and emoji 😀 stay exact.",
]


def _text(seed: int, lines: int = 300) -> str:
    rng = np.random.default_rng(seed)
    return "\n".join(LINES[i] for i in rng.integers(0, len(LINES), lines)) + "\n"


@pytest.fixture
def library(tmp_path):
    """A folder of text: nested, with Markdown, a Gutenberg book, and files that must be left out."""
    root = tmp_path / "library"
    (root / "b" / "deep").mkdir(parents=True)
    (root / ".git").mkdir()
    (root / "a.txt").write_text(_text(1), encoding="utf-8")
    (root / "b" / "notes.md").write_text(_text(2).rstrip("\n"), encoding="utf-8")  # no final newline
    (root / "b" / "deep" / "c.txt").write_bytes(
        (
            "*** START OF THE PROJECT GUTENBERG EBOOK X ***\r\n"
            + _text(3)
            + "*** END OF THE PROJECT GUTENBERG EBOOK X ***\r\n"
            "licence\r\n"
        ).encode("utf-8")
    )
    (root / "b" / "image.png").write_bytes(bytes(range(256)))
    (root / ".hidden.txt").write_text("never read", encoding="utf-8")
    (root / ".git" / "HEAD.txt").write_text("never read", encoding="utf-8")
    return root


def _arrays(prepared):
    """prepare_data's result with the windows' token ids (numpy memmaps) in place of the windows."""
    name, tokenizer, options, train, val = prepared
    return name, tokenizer, options, train.ids, val.ids


def _config(data_value, **changes):
    return TrainConfig(**{"data": data_value, "device": "cpu", **changes})


def _prepared(data_value, tokenizer="char", **changes):
    _, tok, options, train_ids, val_ids = _arrays(
        prepare_data(_config(data_value, tokenizer=tokenizer, **changes), BLOCK)
    )
    return tok, options, np.concatenate([train_ids, val_ids])


class _Phases:
    def __init__(self):
        self.seen = []

    def __call__(self, phase, done, total, unit="bytes"):
        if not self.seen or self.seen[-1] != phase:
            self.seen.append(phase)


# --- sources --------------------------------------------------------------------------------------


def test_a_folder_is_read_recursively_in_path_order_with_default_globs(library):
    corpus = resolve_corpus(str(library))
    assert [p.relative_to(library).as_posix() for p in corpus.files] == ["a.txt", "b/deep/c.txt", "b/notes.md"]
    assert corpus.name == "library" and corpus.size == sum(p.stat().st_size for p in corpus.files)
    text, _ = load_corpus(str(library))
    parts = [read_corpus(library / "a.txt"), read_corpus(library / "b/deep/c.txt"), read_corpus(library / "b/notes.md")]
    assert text == "".join(parts)  # each part ends with a newline except the last: nothing inserted
    assert "START OF THE PROJECT" not in text and "licence" not in text  # Gutenberg stripped per file
    assert "never read" not in text


def test_glob_chooses_the_files_and_several_values_join_with_a_newline(library, tmp_path):
    only_md = resolve_corpus(str(library), ["*.md"])
    assert [p.name for p in only_md.files] == ["notes.md"]
    assert [p.name for p in resolve_corpus(str(library), ["deep/*.txt"]).files] == ["c.txt"]
    extra = tmp_path / "extra.txt"
    extra.write_text("one more line", encoding="utf-8")
    text, name = load_corpus([str(library / "b" / "notes.md"), str(extra), str(library)], ["*.md"])
    notes = read_corpus(library / "b" / "notes.md")
    assert text == notes + "\n" + "one more line"  # notes.md seen again through the folder: read once
    assert name == "notes-and-2-more"


def test_a_dataset_may_be_a_collection_of_files(register_dataset, sherlock_path, tmp_path):
    second = tmp_path / "second.txt.xz"
    second.write_bytes(lzma.compress(b"A second book.\n"))
    register_dataset("two-books", lambda: Collection((LocalText(sherlock_path), LocalText(second)), "two books"))
    corpus = resolve_corpus("two-books")
    assert corpus.files == (sherlock_path, second)
    text, name = load_corpus("two-books")
    book = read_corpus(sherlock_path)
    assert text == book + ("" if book.endswith("\n") else "\n") + "A second book.\n" and name == "two-books"
    tok, _, ids = _prepared("two-books")
    assert tok.decode(ids[-15:].tolist()) == "A second book.\n"


def test_builtin_sherlock_trains_as_before(no_network):
    tok, _, ids = _prepared("sherlock")
    text, _ = load_corpus("sherlock")
    assert len(ids) == len(text) and tok.decode(ids[:200].tolist()) == text[:200]


@pytest.mark.parametrize("block", [1, 3, 7, 64])
def test_streamed_reading_equals_reading_whole(tmp_path, monkeypatch, block):
    monkeypatch.setattr(data, "WHOLE_FILE_LIMIT", 5)  # force the streaming path on small files
    text = "\ufeffcafé\r\nline two\rthree\r\r\n😀 end\r" + "ab\r\ncd\r" * 20
    path = tmp_path / "t.txt"
    path.write_bytes(text.encode("utf-8"))
    pieces = list(iter_text(path, block_size=block))
    assert "".join(piece for piece, _ in pieces) == read_corpus(path)
    assert sum(read for _, read in pieces) == path.stat().st_size
    gz = tmp_path / "t.txt.gz"
    import gzip

    gz.write_bytes(gzip.compress(text.encode("utf-8")))
    assert "".join(piece for piece, _ in iter_text(gz, block_size=block)) == read_corpus(path)


@pytest.mark.parametrize(
    "content,problem",
    [(b"abc" * 10 + b"\x00rest", "looks binary"), (b"abcdefghij\xff\xfe tail", "bad byte at offset 10")],
)
def test_streamed_reading_names_the_same_faults(tmp_path, monkeypatch, content, problem):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(AnexaError, match=problem):
        read_corpus(path)
    monkeypatch.setattr(data, "WHOLE_FILE_LIMIT", 4)
    with pytest.raises(AnexaError, match=problem) as caught:
        list(iter_text(path, block_size=3))
    assert str(path) in str(caught.value)


# --- chunks ---------------------------------------------------------------------------------------


def test_chunked_bpe_equals_whole_text_bpe(sherlock_path):
    """Chunks end where the byte-level pre-tokenizer never joins text, so ids and merges match exactly."""
    text = read_corpus(sherlock_path)[:150_000] + (" x  \n\n\tindented\n  two\n😀 中文\n'll\n" * 200)
    whole, _ = plugins.create("tokenizers", "bpe", {"vocab_size": 600})
    whole.train([text])
    chunks = list(tokens.text_chunks([text[i : i + 999] for i in range(0, len(text), 999)], size=2000))
    assert "".join(chunks) == text and max(map(len, chunks)) <= 2000 and len(chunks) > 50
    chunked, _ = plugins.create("tokenizers", "bpe", {"vocab_size": 600})
    chunked.train(iter(chunks))
    assert chunked.state_dict() == whole.state_dict()
    assert [i for ids in whole.encode_batch(chunks) for i in ids] == whole.encode(text)


def test_char_encode_batch_matches_encode_and_its_errors(sherlock_path):
    text = read_corpus(sherlock_path)[:20_000] + "é😀"
    tok, _ = plugins.create("tokenizers", "char")
    tok.train(tokens.text_chunks([text], size=1000))
    assert tok.chars == "".join(sorted(set(text)))
    ascii_part, mixed = text[:5000], text[-3000:]
    assert [a.tolist() for a in tok.encode_batch([ascii_part, mixed, ""])] == [
        tok.encode(ascii_part),
        tok.encode(mixed),
        [],
    ]
    with pytest.raises(AnexaError, match="never seen in training"):
        tok.encode_batch(["fine", "中"])


# --- the token cache ------------------------------------------------------------------------------


def test_the_second_run_reads_the_cache_without_tokenizing(library, monkeypatch):
    first = _Phases()
    _, tok, _, train_ids, val_ids = _arrays(prepare_data(_config(str(library)), BLOCK, progress=first))
    assert first.seen == [tokens.PHASE_FINGERPRINT, tokens.PHASE_LEARN, tokens.PHASE_TOKENIZE]
    assert isinstance(train_ids, np.memmap) and train_ids.dtype == np.uint16 and not train_ids.flags.writeable
    assert len(train_ids) == int(0.9 * (len(train_ids) + len(val_ids)))
    text, _ = load_corpus(str(library))
    assert tok.decode(np.concatenate([train_ids, val_ids]).tolist()) == text

    def refuse(*args, **kwargs):
        raise AssertionError("tokenized again")

    char = type(tok)
    for method in ("train", "encode", "encode_batch"):
        monkeypatch.setattr(char, method, refuse)
    second = _Phases()
    _, tok2, _, train2, val2 = _arrays(prepare_data(_config(str(library)), BLOCK, progress=second))
    assert tokens.PHASE_LEARN not in second.seen and tokens.PHASE_TOKENIZE not in second.seen
    assert tok2.state_dict() == tok.state_dict()
    assert np.array_equal(train2, train_ids) and np.array_equal(val2, val_ids)


def test_unchanged_files_are_not_hashed_again(library, monkeypatch):
    monkeypatch.setattr(tokens, "STABLE_S", 0.0)  # the files are seconds old; trust them at once
    prepare_data(_config(str(library)), BLOCK)
    again = _Phases()
    prepare_data(_config(str(library)), BLOCK, progress=again)
    assert again.seen == [tokens.PHASE_CHECK]


def test_changing_one_file_or_the_tokenizer_invalidates_the_cache(library):
    _, _options, before = _prepared(str(library), "bpe", tokenizer_options={"vocab_size": 300})
    target = library / "b" / "notes.md"
    old = target.read_text(encoding="utf-8")
    target.write_text(old.replace("April", "March"), encoding="utf-8")  # same size, same second
    phases = _Phases()
    _, tok, _, train_ids, val_ids = _arrays(
        prepare_data(
            _config(str(library), tokenizer="bpe", tokenizer_options={"vocab_size": 300}), BLOCK, progress=phases
        )
    )
    assert tokens.PHASE_TOKENIZE in phases.seen
    assert "March" in tok.decode(np.concatenate([train_ids, val_ids]).tolist())
    bigger = _Phases()
    prepare_data(_config(str(library), tokenizer="bpe", tokenizer_options={"vocab_size": 320}), BLOCK, progress=bigger)
    assert tokens.PHASE_LEARN in bigger.seen and tokens.PHASE_TOKENIZE in bigger.seen
    target.write_text(old, encoding="utf-8")  # back as it was: the first cache is still valid
    back = _Phases()
    _, _, again = _prepared(str(library), "bpe", tokenizer_options={"vocab_size": 300})
    assert np.array_equal(again, before)
    prepare_data(_config(str(library), tokenizer="bpe", tokenizer_options={"vocab_size": 300}), BLOCK, progress=back)
    assert tokens.PHASE_TOKENIZE not in back.seen and tokens.PHASE_LEARN not in back.seen


def _cache_files(suffix):
    found = sorted(
        p
        for p in tokens.tokens_dir().glob(f"*{suffix}")
        if not p.name.endswith(".tokenizer.json") and not p.name.startswith("files-")
    )
    assert len(found) == 1, found
    return found[0]


@pytest.mark.parametrize("damage", ["truncate", "flip", "header", "delete-bin", "tokenizer"])
def test_a_damaged_cache_is_detected_and_rebuilt(library, damage, caplog):
    _, _, expected = _prepared(str(library))
    bin_path = _cache_files(".bin")
    if damage == "truncate":
        bin_path.write_bytes(bin_path.read_bytes()[:-2])
    elif damage == "flip":
        raw = bytearray(bin_path.read_bytes())
        raw[len(raw) // 2] ^= 0x01
        bin_path.write_bytes(bytes(raw))
    elif damage == "header":
        _cache_files(".json").write_text('{"format": "anexa-tokens/1", "tokens": 1', encoding="utf-8")
    elif damage == "delete-bin":
        bin_path.unlink()
    else:
        next(tokens.tokens_dir().glob("*.tokenizer.json")).write_text("{}", encoding="utf-8")
    phases = _Phases()
    with caplog.at_level(logging.WARNING, logger="anexa"):
        _, _tok, _, train_ids, val_ids = _arrays(prepare_data(_config(str(library)), BLOCK, progress=phases))
    assert np.array_equal(np.concatenate([train_ids, val_ids]), expected)
    if damage == "tokenizer":
        assert tokens.PHASE_LEARN in phases.seen and "damaged" in caplog.text
    else:
        assert tokens.PHASE_TOKENIZE in phases.seen
    if damage in ("truncate", "flip", "header"):
        assert {"truncate": "truncated", "flip": "corrupt", "header": "damaged"}[damage] in caplog.text
    assert not list(tokens.tokens_dir().glob(".*.tmp"))  # no temp files left behind


def test_uint32_ids_when_the_vocabulary_does_not_fit_uint16(tmp_path):
    many = "".join(chr(0x4E00 + i) for i in range(30_000))
    many += "".join(chr(0x20000 + i) for i in range(40_000))
    path = tmp_path / "wide.txt"
    path.write_text((many + "\n") * 2, encoding="utf-8")
    corpus = resolve_corpus(str(path))
    digests = tokens.file_digests(corpus.files)
    tok, options = tokens.trained_tokenizer(corpus, digests, "char", {})
    assert tok.vocab_size > 65_536
    stream = tokens.encoded(corpus, digests, tok, "char", options)
    assert stream.ids.dtype == np.uint32 and stream.characters == len(many) * 2 + 2
    assert tok.decode(stream.ids[:5].tolist()) == many[:5]


# --- batches --------------------------------------------------------------------------------------


def test_memmap_windows_equal_in_memory_windows(library):
    _, _, train_ids, _ = _arrays(prepare_data(_config(str(library)), BLOCK))[1:]
    in_memory = torch.tensor(np.asarray(train_ids), dtype=torch.long)
    for seed in (0, 7):
        a = get_batch(train_ids, BLOCK, 8, torch.Generator().manual_seed(seed))
        b = get_batch(in_memory, BLOCK, 8, torch.Generator().manual_seed(seed))
        starts = torch.randint(len(in_memory) - BLOCK - 1, (8,), generator=torch.Generator().manual_seed(seed))
        x = torch.stack([in_memory[s : s + BLOCK] for s in starts.tolist()])  # the loop get_batch replaced
        y = torch.stack([in_memory[s + 1 : s + 1 + BLOCK] for s in starts.tolist()])
        for got in (a, b):
            assert got[0].dtype == torch.int64 and got[0].is_contiguous() and got[1].is_contiguous()
            assert torch.equal(got[0], x) and torch.equal(got[1], y)


# --- configs, resume ------------------------------------------------------------------------------


def test_train_config_takes_one_or_several_data_values(tmp_path):
    assert TrainConfig(data="a.txt").data == "a.txt"
    assert TrainConfig(data=("a", "b")).data == ["a", "b"]
    assert TrainConfig(data_glob="*.rst").data_glob == ["*.rst"]
    with pytest.raises(AnexaError, match="data \\(--data\\) must be"):
        TrainConfig(data=[])
    with pytest.raises(AnexaError, match="--glob"):
        TrainConfig(data_glob=[""])
    config = tmp_path / "c.toml"
    config.write_text('[train]\ndata = ["x.txt", "notes/"]\ndata_glob = ["*.txt"]\n', encoding="utf-8")
    _, train_config = resolve("seed", config)
    assert train_config.data == ["x.txt", "notes/"] and train_config.data_glob == ["*.txt"]


def test_resume_of_a_folder_run_reuses_the_cache_and_stays_exact(library, tmp_path, monkeypatch):
    model = ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=BLOCK)
    config = _config(
        [str(library), str(library / "a.txt")],
        steps=4,
        eval_every=2,
        save_every=2,
        batch_size=4,
        eval_batches=2,
        warmup_steps=1,
        data_glob=["*.txt"],
    )
    train(model, config, tmp_path / "straight")
    train(model, TrainConfig(**{**config.__dict__, "steps": 2, "decay_steps": 4}), tmp_path / "split")
    resumed_model, resumed_train = resume_configs(tmp_path / "split", {"steps": 4})
    assert resumed_train.data == config.data and resumed_train.data_glob == ["*.txt"]

    def refuse(*args, **kwargs):
        raise AssertionError("tokenized again")

    tok_class = type(plugins.create("tokenizers", "char")[0])
    monkeypatch.setattr(tok_class, "encode_batch", refuse)
    train(resumed_model, resumed_train, tmp_path / "split", resume=True)
    import safetensors.torch

    a = safetensors.torch.load_file(tmp_path / "straight" / "model.safetensors")
    b = safetensors.torch.load_file(tmp_path / "split" / "model.safetensors")
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_a_file_rewritten_while_being_read_is_refused(library, monkeypatch):
    original = data.iter_text
    target = library / "b" / "notes.md"

    def rewrite_first(path, *args, **kwargs):
        if path == target:
            target.write_text("rewritten meanwhile\n", encoding="utf-8")
        return original(path, *args, **kwargs)

    monkeypatch.setattr(data, "iter_text", rewrite_first)
    with pytest.raises(AnexaError, match=f"corpus file {target} changed while Anexa was reading it"):
        prepare_data(_config(str(library)), BLOCK)
    assert not list(tokens.tokens_dir().glob("*.bin")) and not list(tokens.tokens_dir().glob("files-*.json"))


# --- bad inputs through the CLI: one line, exit 2 -------------------------------------------------


TRAIN = [
    "train",
    "--n-layer",
    "1",
    "--n-head",
    "2",
    "--n-embd",
    "16",
    "--block-size",
    "16",
    "--steps",
    "2",
    "--eval-every",
    "2",
    "--batch-size",
    "2",
    "--device",
    "cpu",
]


def test_bad_folders_give_one_line(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    user_error(
        [*TRAIN, "--data", str(empty), "--out", str(tmp_path / "r1")],
        f"folder {empty} holds no files matching *.txt, *.md (0 other files): pass --glob",
    )
    binaries = tmp_path / "binaries"
    binaries.mkdir()
    for i in range(3):
        (binaries / f"blob{i}.bin").write_bytes(bytes(range(256)))
    user_error([*TRAIN, "--data", str(binaries), "--out", str(tmp_path / "r2")], "(3 other files)")
    line = user_error(
        [*TRAIN, "--data", str(binaries), "--glob", "*.bin", "--out", str(tmp_path / "r3")],
        "looks binary (it contains NUL bytes): it must be UTF-8 text",
    )
    assert "blob0.bin" in line
    blank = tmp_path / "blank"
    blank.mkdir()
    (blank / "a.txt").write_text("  \n", encoding="utf-8")
    (blank / "b.md").write_text("", encoding="utf-8")
    user_error([*TRAIN, "--data", str(blank), "--out", str(tmp_path / "r4")], "is empty")


def test_a_file_that_disappears_midway_gives_one_line(library, monkeypatch, tmp_path):
    original = tokens.file_digests
    doomed = library / "b" / "notes.md"

    def then_delete(files, progress=None):
        digests = original(files, progress)
        doomed.unlink()
        return digests

    monkeypatch.setattr(tokens, "file_digests", then_delete)
    user_error([*TRAIN, "--data", str(library), "--out", str(tmp_path / "run")], f"corpus file {doomed} not found")


def test_cli_trains_on_several_data_values_with_a_glob(library, tmp_path):
    extra = tmp_path / "extra.md"
    extra.write_text(_text(9), encoding="utf-8")
    result = runner.invoke(
        app, [*TRAIN, "--data", str(library), "--data", str(extra), "--glob", "*.txt", "--out", str(tmp_path / "run")]
    )
    assert result.exit_code == 0, result.output
    from anexa_core.io import checkpoint

    meta = checkpoint.read_metadata(tmp_path / "run" / "model.safetensors")
    assert meta["train_config"]["data"] == [str(library), str(extra)]
    assert meta["train_config"]["data_glob"] == ["*.txt"]


@pytest.fixture
def register_dataset(register_plugin):
    def register(name, factory):
        class Plugin:
            @staticmethod
            @hookimpl
            def register_datasets(register):
                register(name, factory)

        register_plugin(Plugin, f"test-{name}")

    return register


def test_the_cache_header_describes_the_ids(library):
    _, _, ids = _prepared(str(library))
    header = json.loads(_cache_files(".json").read_text(encoding="utf-8"))
    text, _ = load_corpus(str(library))
    assert header["tokens"] == len(ids) and header["characters"] == len(text) and header["dtype"] == "uint16"
    assert header["file_count"] == 3 and header["tokenizer"] == "char"


def test_corpus_pieces_insert_newlines_only_between_files(tmp_path):
    a, b, c = tmp_path / "a.txt", tmp_path / "b.txt", tmp_path / "c.txt"
    a.write_text("no newline", encoding="utf-8")
    b.write_text("", encoding="utf-8")
    c.write_text("ends\n", encoding="utf-8")
    assert "".join(corpus_pieces([a, b, c])) == "no newline\nends\n"
    assert "".join(corpus_pieces([c, a])) == "ends\nno newline"


@pytest.mark.parametrize(("held_s", "says_it_waits"), [(0.1, False), (0.8, True)])
def test_a_process_says_it_waits_for_a_cache_entry_only_when_the_wait_is_long(
    held_s, says_it_waits, monkeypatch, caplog
):
    """torchrun's ranks take turns reading a cached entry: that short wait is silent (a newcomer saw
    "waiting for another Anexa process preparing the same data" for data already cached); a long one is
    said once."""
    import fcntl
    import threading
    import time

    monkeypatch.setattr(tokens, "LOCK_PATIENCE_S", 0.4)
    with tokens._locked("ab"):
        pass  # creates the lock file
    lock_file = tokens.tokens_dir() / "locks" / "ab.lock"
    holder = open(lock_file, "a+b")  # noqa: SIM115 - released by the thread below
    fcntl.flock(holder, fcntl.LOCK_EX)

    def release():
        time.sleep(held_s)
        fcntl.flock(holder, fcntl.LOCK_UN)
        holder.close()

    thread = threading.Thread(target=release)
    thread.start()
    started = time.monotonic()
    with caplog.at_level(logging.INFO, logger="anexa"), tokens._locked("ab"):
        waited = time.monotonic() - started
    thread.join()
    assert waited >= held_s * 0.9  # the lock really was held meanwhile
    said = [r.getMessage() for r in caplog.records if "waiting for another Anexa process" in r.getMessage()]
    assert said == (["waiting for another Anexa process preparing the same data (ab.lock)"] if says_it_waits else [])
