"""A run's corpus as training and validation token ids."""

from __future__ import annotations

import logging
from pathlib import Path

from anexa_core.config import TrainConfig
from anexa_core.data import chats, tokens
from anexa_core.data import corpus as corpora
from anexa_core.errors import AnexaError

logger = logging.getLogger("anexa")


def prepare_data(train_config: TrainConfig, block_size: int, tokenizer=None, progress=None):
    """The corpus of ``train_config.data`` as token ids, split 90/10 into train and val.

    Without ``tokenizer`` the plugin ``train_config.tokenizer`` is trained on the corpus (or loaded from
    the cache when it was trained on the same files before); with one (``--resume``), the corpus is
    encoded with it, and text it cannot encode is refused before any training. Ids come from the token
    cache (:mod:`anexa_core.data.tokens`): the second run on the same data does not tokenize. The split is on
    the token stream: the first 90% of the ids train, the last 10% validate — the same on every run.
    ``progress(phase, done, total)`` is told how reading and tokenizing advance (bytes).

    ``--data chats.jsonl`` (conversations, :mod:`anexa_core.data.chats`) needs the model's tokenizer and
    its chat template: its examples are split 90/10 by conversation, in file order.

    Returns ``(short name, tokenizer, tokenizer options, train examples, val examples)``: for text
    :class:`~anexa_core.train.step.Windows` over 1-D read-only numpy arrays (``uint16``, or ``uint32`` for
    vocabularies over 65,536) mapping the cache file, so memory does not grow with the corpus; for
    conversations :class:`~anexa_core.train.step.Conversations`. ``block_size`` is the training window.
    Raises :class:`AnexaError` for unusable data (one line) and for a corpus with too few tokens for it.
    """
    from anexa_core.train.step import Conversations, Windows

    if chats.is_chats_file(train_config.data):
        if tokenizer is None:
            raise AnexaError("--data with conversations fine-tunes a pretrained chat model: pass --init-from MODEL")
        loaded = chats.load_chats(Path(str(train_config.data)).expanduser(), tokenizer, block_size)
        if len(loaded.examples) < 2:
            raise AnexaError(
                f"--data {train_config.data} has {len(loaded.examples)} usable conversation(s): give at "
                "least 2 (one is held out to validate)"
            )
        split = max(1, min(len(loaded.examples) - 1, int(0.9 * len(loaded.examples))))
        logger.info(
            "%d conversations, %d tokens of which %d trained (assistant turns); %d cut to %d tokens",
            len(loaded.examples),
            loaded.tokens,
            loaded.trained_tokens,
            loaded.truncated,
            block_size + 1,
        )
        name = Path(str(train_config.data)).stem
        return (
            name,
            tokenizer,
            train_config.tokenizer_options,
            Conversations(loaded.examples[:split]),
            Conversations(loaded.examples[split:]),
        )
    corpus = corpora.resolve_corpus(train_config.data, train_config.data_glob, train_config.data_options)
    digests = tokens.file_digests(corpus.files, progress)
    if tokenizer is None:
        tokenizer, options = tokens.trained_tokenizer(
            corpus, digests, train_config.tokenizer, train_config.tokenizer_options, progress
        )
        stream = tokens.encoded(corpus, digests, tokenizer, train_config.tokenizer, options, progress)
    else:
        options = train_config.tokenizer_options
        try:
            stream = tokens.encoded(corpus, digests, tokenizer, train_config.tokenizer, options, progress)
        except tokens.TokenizeError as exc:
            raise AnexaError(
                f"--data {corpora.data_label(train_config.data)} does not fit this run's tokenizer: {exc}"
            ) from None
    ids = stream.ids
    split = int(0.9 * len(ids))
    train_ids, val_ids = ids[:split], ids[split:]
    if len(val_ids) <= block_size + 1:  # a validation window and the token after it must fit the last tenth
        need = (block_size + 2) * 10
        longest = len(val_ids) - 2
        shorter = f" or --seq-len {longest} or shorter" if longest > 0 else ""
        raise AnexaError(
            f"corpus {corpora.data_label(train_config.data)} has {len(ids):,} tokens, too few for training windows "
            f"of {block_size:,} (the last tenth is kept for validation): use a text of at least {need:,} tokens{shorter}"
        )
    return corpus.name, tokenizer, options, Windows(train_ids, block_size), Windows(val_ids, block_size)
