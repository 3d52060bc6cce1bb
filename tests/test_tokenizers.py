"""The built-in tokenizers: discovery, exact round trips on real text, serialisation, and their limits."""

import json
import random
import string

import pytest
from helpers import loaded_tokenizer, trained_tokenizer

from anexa_core import AnexaError, plugins
from anexa_core.data.corpus import read_corpus
from anexa_core.interfaces import Tokenizer

BPE_TRAIN_CHARS = 200_000  # enough for real merges, still well under a second to train
# Text no book teaches: accents, emoji, CJK, runs of whitespace, CRLF, control and zero-width chars.
HARD_TEXT = "naïve café — “quoted” 😀🚀 中文テキスト\t tabs\n\n\n  indented\r\nCRLF \x00\x7f\u200b end  "


@pytest.fixture(scope="module")
def sherlock_text(sherlock_path):
    return read_corpus(sherlock_path)


@pytest.fixture(scope="module")
def char_tokenizer(sherlock_text):
    return trained_tokenizer("char", sherlock_text)


@pytest.fixture(scope="module")
def bpe_training_text(sherlock_text):
    """The first half of the book (at most BPE_TRAIN_CHARS); the second half stays unseen."""
    return sherlock_text[: len(sherlock_text) // 2][:BPE_TRAIN_CHARS]


@pytest.fixture(scope="module")
def held_out_text(sherlock_text):
    return sherlock_text[len(sherlock_text) // 2 :][:100_000]


@pytest.fixture(scope="module")
def bpe_tokenizer(bpe_training_text):
    return trained_tokenizer("bpe", bpe_training_text, vocab_size=512)


@pytest.mark.parametrize("name", ["char", "bpe"])
def test_tokenizers_are_discovered_and_satisfy_the_protocol(name, sherlock_text):
    assert name in plugins.registered("tokenizers")
    options = {} if name == "char" else {"vocab_size": 300}
    tokenizer = trained_tokenizer(name, sherlock_text[:20_000], **options)
    assert isinstance(tokenizer, Tokenizer)
    assert isinstance(tokenizer.vocab_size, int) and tokenizer.vocab_size > 0
    assert tokenizer.state_dict()["type"] == name


def test_char_round_trips_the_whole_book(char_tokenizer, sherlock_text):
    ids = char_tokenizer.encode(sherlock_text)
    assert len(ids) == len(sherlock_text)
    assert max(ids) == char_tokenizer.vocab_size - 1 and min(ids) == 0
    assert char_tokenizer.decode(ids) == sherlock_text
    assert char_tokenizer.vocab_size == len(set(sherlock_text))


def test_char_vocabulary_is_sorted_and_stable():
    tokenizer = trained_tokenizer("char", "banana bread")
    assert tokenizer.state_dict() == {"type": "char", "chars": " abdenr"}
    assert tokenizer.encode("bread") == [2, 6, 4, 1, 3]
    assert trained_tokenizer("char", "bread banana").state_dict() == tokenizer.state_dict()


def test_char_trains_on_chunks_like_on_the_whole_text():
    whole = trained_tokenizer("char", "banana bread")
    chunked, _ = plugins.create("tokenizers", "char")
    chunked.train(iter(["bana", "na br", "", "ead"]))
    assert chunked.state_dict() == whole.state_dict()


def test_char_unseen_characters_are_named(char_tokenizer):
    unseen = "\u00e9" if "\u00e9" not in char_tokenizer.state_dict()["chars"] else "\u20ac"
    with pytest.raises(AnexaError) as caught:
        char_tokenizer.encode(f"Holmes said {unseen}!")
    message = str(caught.value)
    assert repr(unseen) in message and "\n" not in message
    assert "only knows the characters of its training text" in message


def test_char_many_unseen_characters_are_summarised():
    tokenizer = trained_tokenizer("char", "abc")
    with pytest.raises(AnexaError, match=r"'d', 'e', 'f', 'g', 'h' and 2 more"):
        tokenizer.encode("abcdefghij")


def test_char_rejects_a_vocab_size_and_empty_text():
    with pytest.raises(AnexaError, match="tokenizer char takes no options, got 'vocab_size'"):
        plugins.create("tokenizers", "char", {"vocab_size": 100})
    with pytest.raises(AnexaError, match="empty"):
        trained_tokenizer("char", "")


@pytest.mark.parametrize(
    "data",
    [
        {"type": "bpe", "chars": "abc"},
        {"type": "char"},
        {"type": "char", "chars": ""},
        {"type": "char", "chars": "cba"},
        {"type": "char", "chars": "aab"},
        ["not", "a", "dict"],
    ],
)
def test_char_from_dict_rejects_malformed_data(data):
    with pytest.raises(AnexaError, match="malformed"):
        loaded_tokenizer("char", data)


def test_bpe_round_trips_real_text(bpe_tokenizer, held_out_text):
    ids = bpe_tokenizer.encode(held_out_text)
    assert bpe_tokenizer.decode(ids) == held_out_text
    assert len(ids) < len(held_out_text) / 2, "merges learned from the book should compress its prose"


@pytest.mark.parametrize(
    "text", [HARD_TEXT, "😀", " ", "\n\n", "  leading and trailing  ", "a" * 1000, "\ufeffBOM", ""]
)
def test_bpe_round_trips_any_text(bpe_tokenizer, text):
    ids = bpe_tokenizer.encode(text)
    assert all(0 <= i < bpe_tokenizer.vocab_size for i in ids)
    assert bpe_tokenizer.decode(ids) == text


@pytest.fixture(scope="module")
def varied_text():
    """Many distinct made-up words: enough merge candidates for any vocab size tested here."""
    rng = random.Random(0)
    words = ("".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 9))) for _ in range(40_000))
    return " ".join(words)


def test_bpe_uses_learned_merges_within_its_vocab(bpe_tokenizer, held_out_text):
    assert 256 < bpe_tokenizer.vocab_size <= 512
    ids = bpe_tokenizer.encode(held_out_text)
    assert max(ids) < bpe_tokenizer.vocab_size
    assert max(ids) >= 256, "learned merges must be used"


@pytest.mark.parametrize("requested", [300, 777, None])
def test_bpe_vocab_size_is_respected(varied_text, requested):
    from anexa_plugins.bpe_tokenizer import DEFAULT_VOCAB_SIZE

    options = {} if requested is None else {"vocab_size": requested}
    tokenizer = trained_tokenizer("bpe", varied_text, **options)
    assert tokenizer.vocab_size == (requested or DEFAULT_VOCAB_SIZE)
    assert tokenizer.decode(tokenizer.encode(varied_text[:5000])) == varied_text[:5000]


def test_bpe_vocab_is_capped_by_what_the_text_offers_and_says_so(caplog):
    tokenizer = trained_tokenizer("bpe", "ab ab ab", vocab_size=1024)
    assert 256 < tokenizer.vocab_size < 1024
    assert tokenizer.decode(tokenizer.encode(HARD_TEXT)) == HARD_TEXT
    assert [record.getMessage() for record in caplog.records] == [
        f"--vocab-size 1024: the vocabulary has {tokenizer.vocab_size} tokens, all the text offers (256 bytes and "
        "every merge it repeats)"
    ]
    caplog.clear()
    trained_tokenizer("bpe", "ab ab ab", vocab_size=tokenizer.vocab_size)  # reached exactly: nothing to say
    assert caplog.records == []


def test_bpe_training_is_deterministic(sherlock_text):
    first = trained_tokenizer("bpe", sherlock_text[:30_000], vocab_size=400)
    second = trained_tokenizer("bpe", sherlock_text[:30_000], vocab_size=400)
    assert first.state_dict() == second.state_dict()


@pytest.mark.parametrize("size", [0, 100, 256, -5, 2**20 + 1])
def test_bpe_vocab_size_out_of_range_is_rejected(size):
    with pytest.raises(AnexaError, match="does not fit byte-level BPE: use 257 to 1048576"):
        plugins.create("tokenizers", "bpe", {"vocab_size": size})


@pytest.mark.parametrize(
    "data",
    [{"type": "char", "tokenizer": "{}"}, {"type": "bpe"}, {"type": "bpe", "tokenizer": "{not json"}, "bpe"],
)
def test_bpe_from_dict_rejects_malformed_data(data):
    with pytest.raises(AnexaError, match="malformed"):
        loaded_tokenizer("bpe", data)


@pytest.mark.parametrize("name", ["char", "bpe"])
def test_serialised_tokenizer_encodes_identically(name, char_tokenizer, bpe_tokenizer, held_out_text):
    tokenizer = {"char": char_tokenizer, "bpe": bpe_tokenizer}[name]
    saved = json.dumps(tokenizer.state_dict())
    restored = loaded_tokenizer(name, json.loads(saved))
    sample = held_out_text[:40_000]
    assert restored.vocab_size == tokenizer.vocab_size
    assert restored.encode(sample) == tokenizer.encode(sample)
    assert restored.decode(tokenizer.encode(sample)) == sample


def test_decode_rejects_ids_outside_the_vocabulary(char_tokenizer, bpe_tokenizer):
    for tokenizer in (char_tokenizer, bpe_tokenizer):
        with pytest.raises(AnexaError, match="outside"):
            tokenizer.decode([0, tokenizer.vocab_size])
        with pytest.raises(AnexaError, match="outside"):
            tokenizer.decode([-1])


# --- token_bytes: what one token adds to the text, part of a character included -----------------------


def test_token_bytes_are_what_each_token_adds_even_inside_a_character(bpe_tokenizer, char_tokenizer, held_out_text):
    """The server's logprobs ``bytes``: a byte-level token may hold part of a character, which its decode
    alone shows as U+FFFD; its bytes are its own, and joined they are the text's."""
    from anexa_core.infer.generation import token_bytes

    for text in (HARD_TEXT, "😀", held_out_text[:5000]):
        ids = bpe_tokenizer.encode(text)
        assert b"".join(bpe_tokenizer.token_bytes(i) for i in ids) == text.encode("utf-8")
    emoji = bpe_tokenizer.encode("😀")
    assert len(emoji) > 1 and all(bpe_tokenizer.decode([i]) == "\ufffd" for i in emoji)
    assert [token_bytes(bpe_tokenizer, i) for i in emoji] == [bpe_tokenizer.token_bytes(i) for i in emoji]
    with pytest.raises(AnexaError, match="outside"):
        bpe_tokenizer.token_bytes(bpe_tokenizer.vocab_size)
    # A tokenizer without token_bytes (char: every token a whole character) is read through decode.
    assert not hasattr(char_tokenizer, "token_bytes")
    wide = next(char for char in char_tokenizer.decode(range(char_tokenizer.vocab_size)) if ord(char) > 127)
    assert [token_bytes(char_tokenizer, i) for i in char_tokenizer.encode(f"a{wide}")] == [b"a", wide.encode()]


def test_token_bytes_of_byte_fallback_and_special_tokens():
    """SentencePiece-style byte tokens (``<0xC3>``, Llama 2's ``byte_fallback``) stand for their byte; a
    special token's bytes are its text; a plain token's (no byte-level alphabet) its decode."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {f"<0x{byte:02X}>": byte for byte in range(256)} | {"a": 256, "b": 257, "ab": 258, "é": 259}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b")], byte_fallback=True))
    tokenizer.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    tokenizer.add_special_tokens([AddedToken("<|end|>", special=True)])
    hf, _ = plugins.create("tokenizers", "hf", {})
    hf.load_state_dict({"type": "hf", "tokenizer": tokenizer.to_str(), "special_tokens": {}, "eos_tokens": []})
    ids = hf.encode("ab😀é")
    assert [hf.token_bytes(i) for i in ids] == [b"ab", b"\xf0", b"\x9f", b"\x98", b"\x80", "é".encode()]
    assert hf.decode([ids[1]]) == "\ufffd"
    end = hf.encode("<|end|>")
    assert len(end) == 1 and hf.token_bytes(end[0]) == b"<|end|>"
    # A byte-level vocabulary writes its tokens in GPT-2's alphabet ("Ġ" is the space byte, 0x20, "é" the
    # byte 0xE9); a special token's text is not written so: "<|café|>" is its UTF-8 text, not byte 0xE9.
    from anexa_plugins.hf_backed import byte_level_alphabet

    alphabet = byte_level_alphabet()
    level = Tokenizer(models.BPE(vocab=dict(alphabet), merges=[]))
    level.decoder = decoders.ByteLevel()
    level.add_special_tokens([AddedToken("<|café|>", special=True)])
    hf.load_state_dict({"type": "hf", "tokenizer": level.to_str(), "special_tokens": {}, "eos_tokens": []})
    special = level.token_to_id("<|café|>")
    assert hf.token_bytes(special) == "<|café|>".encode() and hf.token_bytes(level.token_to_id("é")) == b"\xe9"
    assert hf.token_bytes(level.token_to_id("Ġ")) == b" "
    holed = Tokenizer(models.BPE(vocab={"a": 0, "c": 2}, merges=[]))  # id 1 has no token: it adds nothing
    hf.load_state_dict({"type": "hf", "tokenizer": holed.to_str(), "special_tokens": {}, "eos_tokens": []})
    assert hf.token_bytes(1) == b"" == hf.decode([1]).encode()

    assert alphabet["Ġ"] == 0x20 and alphabet["!"] == 0x21 and sorted(alphabet.values()) == list(range(256))
    assert set(alphabet) == set(pre_tokenizers.ByteLevel.alphabet())  # the symbols `tokenizers` writes
    spaced = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False).pre_tokenize_str("é 😀")
    assert bytes(alphabet[symbol] for piece, _ in spaced for symbol in piece) == "é 😀".encode()
    assert alphabet["Ā"] == 0x00 and alphabet["Ń"] == 0xAD  # the 68 hidden bytes, in order


# --- streaming: the text of generated ids as they arrive ---------------------------------------------


class CountingTokenizer:
    """Wraps a tokenizer and records how many ids each decode call gets."""

    def __init__(self, inner):
        self.inner, self.sizes = inner, []

    def decode(self, ids):
        self.sizes.append(len(ids))
        return self.inner.decode(ids)


def test_streaming_decodes_a_bounded_tail_so_it_is_linear(bpe_tokenizer, held_out_text):
    from anexa_core.infer.generation import decode_stream

    ids = bpe_tokenizer.encode(held_out_text[:30_000])
    counting = CountingTokenizer(bpe_tokenizer)
    assert "".join(decode_stream(counting, iter(ids))) == bpe_tokenizer.decode(ids)
    assert max(counting.sizes) <= 8, "each decode sees only the last few ids"
    assert sum(counting.sizes) <= 4 * len(ids), "total decode work grows linearly with the output"


def test_streaming_holds_back_split_characters_and_gives_up_on_garbage(bpe_tokenizer):
    from anexa_core.infer.generation import MAX_PENDING_TOKENS, decode_stream

    text = "emoji 😀 then 中文 and more"
    ids = bpe_tokenizer.encode(text)
    assert len(ids) > len(text.encode("utf-8")) // 2  # unseen characters: split into byte tokens
    pieces = list(decode_stream(bpe_tokenizer, iter(ids)))
    assert "".join(pieces) == text and not any("\ufffd" in piece for piece in pieces)
    lone = bpe_tokenizer.encode("😀")[:1]  # the first byte(s) of a four-byte character, never completed
    if bpe_tokenizer.decode(lone).endswith("\ufffd"):
        garbage = lone * (MAX_PENDING_TOKENS + 4)
        streamed = "".join(decode_stream(bpe_tokenizer, iter(garbage)))
        assert streamed == bpe_tokenizer.decode(garbage)
