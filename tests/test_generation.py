"""Decoding details the model-level tests do not pin: the streamed text, the chain's view of the context,
the forward passes spent, the precision, and ``generate_text`` as the CLI and the server call it."""

import pytest
import torch
from helpers import TINY, Greedy, loaded_tokenizer, tiny_model

from anexa_core.errors import AnexaError
from anexa_core.infer.generation import MAX_PENDING_TOKENS, decode_stream, encode_prompt, generate_ids, generate_text
from anexa_core.infer.sampling import build_chain

CHARS = "".join(chr(97 + i) for i in range(TINY.vocab_size - 3)) + " \n\r"  # 37 characters, ids 0..36


def _tokenizer():
    return loaded_tokenizer("char", {"type": "char", "chars": "".join(sorted(CHARS))})


class Recording:
    """A greedy chain that keeps what it was shown: the logits and the context of every pick."""

    def __init__(self):
        self.logits, self.contexts, self.generators = [], [], []

    def pick(self, logits, context, generator=None):
        self.logits.append(logits.clone())
        self.contexts.append(context[0].tolist())
        self.generators.append(generator)
        return logits.argmax(-1, keepdim=True)


class CountingForwards(torch.nn.Module):
    """The model, counting its forward passes and the positions each one computes."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config, self.lengths = model, model.config, []
        self.batched = model.batched

    def forward(self, idx, *args, **kwargs):
        self.lengths.append(idx.size(1))
        return self.model(idx, *args, **kwargs)


# --- generate_ids ---------------------------------------------------------------------------------


def test_the_chain_sees_float32_logits_of_the_last_position_and_the_whole_history():
    """Past the window and past the history buffer's first size (16 + 2·(prompt + n/8) ids), the context
    the samplers see is every id so far, uncropped: a repetition penalty looks back over all of it."""
    model = tiny_model(seed=5)
    prompt = [3, 1, 4, 1, 5]
    chain = Recording()
    produced = list(generate_ids(model, prompt, 60, chain, context="sliding"))
    assert len(produced) == 60 and len(chain.contexts) == 60
    for i, context in enumerate(chain.contexts):
        assert context == prompt + produced[:i]
    for logits, context in zip(chain.logits, chain.contexts, strict=True):
        window = torch.tensor([context[-TINY.block_size :]])
        assert logits.dtype == torch.float32 and logits.shape == (1, TINY.vocab_size)
        torch.testing.assert_close(logits, model(window)[0][:, -1], rtol=1e-5, atol=1e-5)


def test_decoding_runs_in_float32_on_the_cpu_not_under_the_training_precision():
    """Training autocasts to bf16 where the CPU has bf16 instructions; decoding must not (greedy picks would
    differ between the cached and the recomputed path). bf16 would be off by about 1e-3 here."""
    model = tiny_model(seed=6)
    chain = Recording()
    list(generate_ids(model, [1, 2, 3], 1, chain))
    expected = model(torch.tensor([[1, 2, 3]]), last_only=True)[0][:, -1]
    torch.testing.assert_close(chain.logits[0], expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("policy", ["shift", "sliding"])
def test_one_forward_pass_per_token_asked_for_and_none_after_the_last(policy):
    """The prompt once, then one position per token while the window has room; the last token is picked
    from logits already computed, so n tokens cost n forward passes."""
    model = CountingForwards(tiny_model(seed=7))
    produced = list(generate_ids(model, [1, 2, 3, 4], 5, Greedy(), context=policy))
    assert len(produced) == 5
    assert model.lengths == [4, 1, 1, 1, 1]
    model.lengths.clear()
    assert list(generate_ids(model, [1, 2, 3, 4], 1, Greedy(), context=policy)) == produced[:1]
    assert model.lengths == [4]
    model.lengths.clear()
    assert list(generate_ids(model, [1, 2, 3, 4], 0, Greedy(), context=policy)) == []
    assert model.lengths == []  # no forward pass for a token nobody asked for


def test_a_full_window_recomputes_half_of_it_under_shift_and_all_of_it_under_sliding():
    block = TINY.block_size  # 16
    shifted = CountingForwards(tiny_model(seed=8))
    list(generate_ids(shifted, list(range(10)), 20, Greedy(), context="shift"))
    # 10 prompt positions, 6 single tokens fill the window, then 8 kept + 1 per token up to 16 again.
    assert shifted.lengths == [10] + [1] * 6 + [block // 2] + [1] * 8 + [block // 2] + [1] * 3
    sliding = CountingForwards(tiny_model(seed=8))
    list(generate_ids(sliding, list(range(10)), 20, Greedy(), context="sliding"))
    assert sliding.lengths == [10] + [1] * 6 + [block] * 13
    uncached = CountingForwards(tiny_model(seed=8))
    list(generate_ids(uncached, list(range(10)), 4, Greedy(), use_cache=False))
    assert uncached.lengths == [10, 11, 12, 13]


def test_a_prompt_longer_than_the_context_keeps_its_last_block_size_ids():
    chain = Recording()
    prompt = list(range(30))
    list(generate_ids(tiny_model(), prompt, 2, chain))
    assert chain.contexts[0] == prompt[-TINY.block_size :]


def test_the_generator_reaches_the_chain_and_seeds_reproduce():
    model = tiny_model(seed=9)
    chain = Recording()
    generator = torch.Generator().manual_seed(1)
    list(generate_ids(model, [1], 3, chain, generator))
    assert all(g is generator for g in chain.generators)
    sample = build_chain(["temperature=2"])

    def draw(seed):
        return list(generate_ids(model, [1, 2], 30, sample, torch.Generator().manual_seed(seed)))

    assert draw(3) == draw(3) and draw(3) != draw(4)


def test_bad_arguments_are_one_line_errors():
    with pytest.raises(AnexaError, match=r"^the prompt is empty: give at least one character of text$"):
        list(generate_ids(tiny_model(), [], 3, Greedy()))
    with pytest.raises(AnexaError, match=r"^unknown context policy 'wrap': choose one of shift, sliding$"):
        list(generate_ids(tiny_model(), [1], 3, Greedy(), context="wrap"))


# --- streamed text --------------------------------------------------------------------------------


class Replacement:
    """Every id decodes to U+FFFD, as bytes of a character that never completes would."""

    def decode(self, ids):
        return "\ufffd" * len(ids)


class WithSilentIds:
    """Id 0 decodes to nothing (like a special token); others to a letter."""

    def decode(self, ids):
        return "".join("" if i == 0 else chr(96 + i) for i in ids)


def _pieces_with_pulls(tokenizer, ids):
    """Each streamed piece with how many ids had been pulled when it came out."""
    pulled = []

    def source():
        for i in ids:
            pulled.append(i)
            yield i

    return [(piece, len(pulled)) for piece in decode_stream(tokenizer, source())]


def test_an_unfinished_character_is_held_back_for_at_most_max_pending_tokens():
    pieces = _pieces_with_pulls(Replacement(), range(MAX_PENDING_TOKENS + 3))
    # Released after MAX_PENDING_TOKENS ids; the next ones wait again, until the stream ends.
    assert pieces == [("\ufffd" * MAX_PENDING_TOKENS, MAX_PENDING_TOKENS), ("\ufffd" * 3, MAX_PENDING_TOKENS + 3)]
    assert "".join(piece for piece, _ in _pieces_with_pulls(Replacement(), range(5))) == "\ufffd" * 5  # the end


class ByteTokens:
    """Ids stand for byte strings, as a byte-level BPE's tokens do (merges across characters included),
    and decode as UTF-8 with U+FFFD for what is not (yet) a character."""

    def __init__(self, tokens):
        self.tokens = tokens

    def decode(self, ids):
        return b"".join(self.tokens[i] for i in ids).decode("utf-8", "replace")


def test_a_stream_never_shows_part_of_a_character_even_when_every_token_ends_inside_one():
    """Issue 24: streaming showed U+FFFD where a character spans two tokens. `——` as byte-level BPE
    merges it (`E2 80 | 94 E2 | 80 | 94 E2 | …`) leaves the text unfinished after every token; each dash
    is shown as soon as it is whole, and no U+FFFD ever is."""
    dash = "—".encode()
    tokens = [b"a", dash[:2], dash[2:] + dash[:1], dash[1:2], dash[2:], b"b"]
    ids = [0, 1, *[2, 3] * 29, 4, 5]
    pieces = _pieces_with_pulls(ByteTokens(tokens), ids)
    assert "".join(piece for piece, _ in pieces) == "a" + "—" * 30 + "b"
    assert not any("\ufffd" in piece for piece, _ in pieces)
    # Each dash as soon as it is whole: after `94 E2` (the 3rd id) and again after the 5th.
    assert [(piece, pulled) for piece, pulled in pieces if pulled <= 5] == [("a", 1), ("—", 3), ("—", 5)]


def test_streamed_pieces_are_whole_characters_however_the_bytes_are_cut():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    @settings(max_examples=300, deadline=None, derandomize=True)
    @given(st.text(alphabet="aé—“”日😀\n", max_size=40), st.lists(st.integers(1, 5), min_size=1))
    def whole(text, cuts):
        data, chunks, at = text.encode(), [], 0
        while at < len(data):
            size = cuts[len(chunks) % len(cuts)]
            chunks.append(data[at : at + size])
            at += size
        pieces = [piece for piece, _ in _pieces_with_pulls(ByteTokens(chunks), range(len(chunks)))]
        assert "".join(pieces) == text and not any("\ufffd" in piece for piece in pieces)

    whole()


def test_a_flushed_stream_gives_its_tail_once_and_goes_on_afresh():
    from anexa_core.infer.generation import TextStream

    dash = "—".encode()
    stream = TextStream(ByteTokens([b"a", dash[:2], dash[2:], b"bc"]))
    assert [stream.add(0), stream.add(1)] == ["a", ""]
    assert [stream.flush(), stream.flush()] == ["\ufffd", ""]  # the unfinished character, shown once
    assert [stream.add(3), stream.add(1), stream.add(2), stream.flush()] == ["bc", "", "—", ""]


def test_stopped_text_shows_what_it_held_back_when_the_output_ends():
    """At the end, :class:`StoppedText` gives the text that could have begun a stop string; a character the
    last token left unfinished (a reply cut by its token limit) is dropped, never shown as U+FFFD — the
    text stream alone still gives it, as ``decode`` does."""
    from anexa_core.infer.generation import StoppedText, TextStream

    dash = "—".encode()
    tokenizer = ByteTokens([b"a", dash[:2], b"Ho", b"lm", b"es"])
    unfinished = StoppedText(tokenizer, stops=["Holmes"])
    assert [unfinished.add(0), unfinished.add(1), unfinished.finish()] == ["a", "", ""]
    plain = StoppedText(tokenizer)
    assert [plain.add(0), plain.add(1), plain.finish()] == ["a", "", ""]
    stream = TextStream(tokenizer)
    assert [stream.add(0), stream.add(1), stream.flush()] == ["a", "", "\ufffd"]
    held = StoppedText(tokenizer, stops=["Holmes"])
    assert [held.add(0), held.add(2), held.add(3), held.finish()] == ["a", "", "", "Holm"]
    assert not held.stopped
    ended = StoppedText(tokenizer, stops=["Holmes"])
    assert [ended.add(i) for i in (0, 2, 3, 4)] == ["a", "", "", ""]
    assert ended.stopped and ended.finish() == ""
    both = StoppedText(tokenizer, stops=["Holmes"])
    assert [both.add(0), both.add(2), both.add(1), both.finish()] == ["a", "", "", "Ho"]


def test_a_reply_continues_its_prompt_a_character_split_between_them_comes_out_whole():
    """Found against the server: a prompt ending inside a character (its first bytes) and a reply whose
    first token completes it gave the reply U+FFFD. Primed with the prompt, the reply's text has the whole
    character, and a prompt's earlier text is never shown again."""
    from anexa_core.infer.generation import StoppedText

    dash = "—".encode()
    tokenizer = ByteTokens([b"Holmes ", dash[:2], dash[2:], b" Watson"])
    alone = StoppedText(tokenizer)
    assert [alone.add(2), alone.add(3), alone.finish()] == ["", "\ufffd Watson", ""]
    primed = StoppedText(tokenizer, prompt=[0, 0, 1])
    assert [primed.add(2), primed.add(3), primed.finish()] == ["—", " Watson", ""]
    whole = StoppedText(tokenizer, prompt=[0, 1, 2])  # a prompt of whole characters: nothing held
    assert [whole.add(3), whole.finish()] == [" Watson", ""]


class WithSpecial(ByteTokens):
    """``ByteTokens`` whose id 0 is a special token (``<|im_start|>``): ``decode`` shows it."""

    special_ids = frozenset({0})


def test_special_tokens_are_never_shown_in_generated_text():
    """Found against the server: a completion showed the model's ``<|im_start|>``. Special tokens are
    structure: a reply's text leaves them out, wherever they come, and around them the text is whole."""
    from anexa_core.infer.generation import StoppedText, TextStream

    dash = "—".encode()
    tokenizer = WithSpecial([b"<|im_start|>", b"user", dash[:1], dash[1:]])
    assert tokenizer.decode([1, 0, 1]) == "user<|im_start|>user"
    shown = StoppedText(tokenizer, prompt=[0, 1, 0])
    assert [shown.add(i) for i in (0, 1, 0, 2, 0, 3)] + [shown.finish()] == ["", "user", "", "", "", "—", ""]
    stream = TextStream(tokenizer)
    assert "".join(stream.add(i) for i in (0, 1, 0)) + stream.flush() == "user"


def test_ids_that_decode_to_nothing_yield_no_empty_pieces():
    pieces = [piece for piece, _ in _pieces_with_pulls(WithSilentIds(), [1, 0, 2, 0, 0, 3, 0])]
    assert pieces == ["a", "b", "c"]


# --- generate_text --------------------------------------------------------------------------------


def test_generate_text_is_the_decoded_ids_of_the_normalised_prompt_cut_at_a_stop():
    model, tokenizer = tiny_model(seed=10), _tokenizer()
    assert encode_prompt(tokenizer, "\ufeffab\r\ncd\re") == tokenizer.encode("ab\ncd\ne")
    ids = list(generate_ids(model, tokenizer.encode("ab\ncd\ne"), 40, Greedy()))
    text = tokenizer.decode(ids)
    assert "".join(generate_text(model, tokenizer, "\ufeffab\r\ncd\re", 40, Greedy())) == text
    visible = next(i for i, char in enumerate(text) if not char.isspace())
    stop = text[visible + 5 : visible + 7]
    cut = text.index(stop, visible + 1)  # a stop counts only after some text (StopStrings)
    assert "".join(generate_text(model, tokenizer, "ab\ncd\ne", 40, Greedy(), stop=[stop])) == text[:cut]


def test_generate_text_seeds_its_own_generator():
    model, tokenizer = tiny_model(seed=11), _tokenizer()
    chain = build_chain(["temperature=2"])

    def text(seed):
        return "".join(generate_text(model, tokenizer, "abc", 30, chain, seed=seed))

    expected = tokenizer.decode(
        generate_ids(model, tokenizer.encode("abc"), 30, chain, torch.Generator().manual_seed(7))
    )
    assert text(7) == expected and text(8) != expected


def test_generate_text_passes_the_context_policy_on():
    model, tokenizer = tiny_model(seed=12), _tokenizer()
    chain = build_chain(["temperature=2"])
    texts = {}
    for policy in ("shift", "sliding"):
        ids = generate_ids(model, tokenizer.encode("abc"), 40, chain, torch.Generator().manual_seed(0), context=policy)
        texts[policy] = "".join(generate_text(model, tokenizer, "abc", 40, chain, seed=0, context=policy))
        assert texts[policy] == tokenizer.decode(list(ids))
    assert texts["shift"] != texts["sliding"], (
        "past the window the policies should differ for this test to mean anything"
    )


def test_generate_text_without_a_seed_draws_from_torchs_global_generator():
    model, tokenizer = tiny_model(seed=13), _tokenizer()
    chain = build_chain(["temperature=2"])
    torch.manual_seed(21)
    text = "".join(generate_text(model, tokenizer, "abc", 30, chain))
    torch.manual_seed(21)
    assert text == tokenizer.decode(generate_ids(model, tokenizer.encode("abc"), 30, chain))


def test_decoding_runs_in_bf16_on_cuda_and_float32_on_a_cpu(monkeypatch):
    """decoding_autocast asks the precision helper for ``auto`` on CUDA (bf16 where the GPU has it) and for
    float32 on a CPU, where bf16 would change greedy picks between cached and recomputed decoding."""
    from anexa_core import device as devices

    asked = []
    monkeypatch.setattr(devices, "autocast", lambda device, precision: asked.append((device, precision)))
    for device in (torch.device("cuda"), torch.device("cuda", 1), torch.device("cpu")):
        devices.decoding_autocast(device)
    assert asked == [(torch.device("cuda"), "auto"), (torch.device("cuda", 1), "auto"), (torch.device("cpu"), "fp32")]


class Marked:
    """A tokenizer as a pretrained model's looks to decoding: ``add_bos``, ``bos_id`` and ``eos_ids`` over
    the char tokenizer's ids (which has none of them)."""

    def __init__(self, add_bos=False, bos_id=None, eos_ids=()):
        self.inner, self.add_bos, self.bos_id, self.eos_ids = _tokenizer(), add_bos, bos_id, eos_ids

    def encode(self, text):
        return self.inner.encode(text)

    def decode(self, ids):
        return self.inner.decode(ids)


class Table:
    """A tokenizer whose every id decodes to ``piece``: the text of any output is known in advance."""

    def __init__(self, piece):
        self.piece = piece

    def decode(self, ids):
        return self.piece * len(ids)


def test_encode_prompt_puts_bos_first_only_when_asked_and_the_tokenizer_has_one():
    ids = _tokenizer().encode("ab\ncd")
    assert encode_prompt(Marked(add_bos=True, bos_id=5), "ab\r\ncd") == [5, *ids]
    assert encode_prompt(Marked(add_bos=True, bos_id=0), "ab\ncd") == [0, *ids]  # id 0 is an id
    assert encode_prompt(Marked(add_bos=True, bos_id=5), "ab\ncd", bos=False) == ids  # a rendered template
    assert encode_prompt(Marked(add_bos=False, bos_id=5), "ab\ncd") == ids
    assert encode_prompt(Marked(add_bos=True, bos_id=None), "ab\ncd") == ids
    assert encode_prompt(_tokenizer(), "ab\ncd") == ids  # a char tokenizer: no BOS attributes at all
    bos_without_asking = Marked(bos_id=5)
    del bos_without_asking.add_bos  # a BOS id alone does not ask for it
    assert encode_prompt(bos_without_asking, "ab\ncd") == ids


def test_generate_text_ends_at_an_end_of_turn_id_and_takes_prompt_ids():
    model = tiny_model(seed=14)
    prompt = _tokenizer().encode("abc")
    ids = list(generate_ids(model, prompt, 40, Greedy()))
    end = ids[12]
    first = ids.index(end)
    tokenizer = Marked(eos_ids={end})
    assert "".join(generate_text(model, tokenizer, "abc", 40, Greedy())) == tokenizer.decode(ids[:first])
    assert "".join(generate_text(model, tokenizer, prompt, 40, Greedy())) == tokenizer.decode(ids[:first])
    assert "".join(generate_text(model, _tokenizer(), prompt, 40, Greedy())) == tokenizer.decode(ids)


# --- generate_samples ---------------------------------------------------------------------------


def _samples_and_alone(model, tokenizer, prompt, seeds, new, chain, **options):
    from anexa_core.infer.generation import generate_samples

    samples = generate_samples(model, tokenizer, prompt, len(seeds), new, chain, seed=seeds[0], **options)
    alone = ["".join(generate_text(model, tokenizer, prompt, new, chain, seed, **options)) for seed in seeds]
    return samples, alone


def test_samples_end_at_an_end_of_turn_id_as_generate_text_does():
    model = tiny_model(seed=15)
    chain = build_chain(["temperature=1.5"])
    free, _ = _samples_and_alone(model, _tokenizer(), "abc", [3, 4, 5, 6], 30, chain)
    end = _tokenizer().encode(free[0][10])[0]
    samples, alone = _samples_and_alone(model, Marked(eos_ids={end}), "abc", [3, 4, 5, 6], 30, chain)
    assert samples == alone and len(samples[0]) == free[0].index(free[0][10]) and samples != free


def test_samples_follow_the_context_policy_as_generate_text_does():
    model = tiny_model(seed=16)
    chain = build_chain(["temperature=2"])
    texts = {}
    for policy in ("shift", "sliding"):
        texts[policy], alone = _samples_and_alone(model, _tokenizer(), "abc", [0, 1], 40, chain, context=policy)
        assert texts[policy] == alone
    assert texts["shift"] != texts["sliding"]


@pytest.mark.parametrize(
    ("piece", "stop", "expected"),
    [
        ("\n", "\n", "\n" * 12),  # a stop written before any text never counts: the sample goes on
        ("aaa", "aa", "a"),  # cut at the first place the stop counts, inside one token's text
        ("ab", "ba", "a"),  # a stop across two tokens
        ("ab", "bx", "ab" * 12),  # the last "b" held back (it may start the stop) until the sample ends
    ],
)
def test_samples_cut_at_a_stop_string_by_the_rule_generate_text_follows(piece, stop, expected):
    model = tiny_model(seed=17)
    samples, alone = _samples_and_alone(model, Table(piece), [1, 2, 3], [0, 1, 2], 12, Greedy(), stop=[stop])
    assert samples == alone == [expected] * 3


def test_samples_without_a_seed_draw_from_torchs_global_generator():
    from anexa_core.infer.generation import generate_samples

    model, tokenizer = tiny_model(seed=18), _tokenizer()
    chain = build_chain(["temperature=2"])
    torch.manual_seed(5)
    first = generate_samples(model, tokenizer, "abc", 3, 20, chain)
    torch.manual_seed(5)
    assert generate_samples(model, tokenizer, "abc", 3, 20, chain) == first and len(set(first)) == 3


class _Scripted:
    """A sampler forcing ``picks[len(context)]`` where the context has that length: the model's choices,
    scripted (the model is random)."""

    order = 50
    reads_context = True

    def __init__(self, picks):
        self.picks = picks

    def __call__(self, logits, context):
        forced = self.picks.get(context.size(-1))
        if forced is None:
            return logits
        return torch.where(torch.arange(logits.size(-1)) == forced, 0.0, float("-inf")).expand_as(logits)


def test_generated_text_continues_its_prompt_and_ends_at_the_stop_ids_given():
    """`generate_text` and `generate_samples` decode a reply as the continuation of its prompt: a prompt of ids
    ending inside a character and a reply whose first token completes it give the whole character; and
    `stop_ids` (a chat's special tokens) end the reply where the tokenizer's own end of turn would not."""
    from anexa_core.infer.generation import generate_samples
    from anexa_core.infer.sampling import SamplerChain

    dash = "—".encode()
    tokenizer = ByteTokens([b"Holmes ", dash[:2], dash[2:], b" Watson", *([b"x"] * 33)])
    model = tiny_model()
    prompt = [0, 1]  # "Holmes " and the dash's first two bytes
    chain = SamplerChain([_Scripted({2: 2, 3: 3, 4: 0})])
    assert "".join(generate_text(model, tokenizer, prompt, 3, chain, seed=0)) == "— WatsonHolmes "
    assert "".join(generate_text(model, tokenizer, prompt, 3, chain, seed=0, stop_ids=[0])) == "— Watson"
    assert "".join(generate_text(model, tokenizer, prompt, 3, chain, seed=0, stop_ids=[3])) == "—"
    assert generate_samples(model, tokenizer, prompt, 2, 2, chain, seed=0) == ["— Watson"] * 2
