"""A run's corpus as training and validation token ids."""

from __future__ import annotations

from anexa_core.config import TrainConfig
from anexa_core.data import corpus as corpora
from anexa_core.data import tokens
from anexa_core.errors import AnexaError


def prepare_data(train_config: TrainConfig, block_size: int, tokenizer=None, progress=None):
    """The corpus of ``train_config.data`` as token ids, split 90/10 into train and val.

    Without ``tokenizer`` the plugin ``train_config.tokenizer`` is trained on the corpus (or loaded from
    the cache when it was trained on the same files before); with one (``--resume``), the corpus is
    encoded with it, and text it cannot encode is refused before any training. Ids come from the token
    cache (:mod:`anexa_core.data.tokens`): the second run on the same data does not tokenize. The split is on
    the token stream: the first 90% of the ids train, the last 10% validate — the same on every run.
    ``progress(phase, done, total)`` is told how reading and tokenizing advance (bytes).

    Returns ``(short name, tokenizer, tokenizer options, train ids, val ids)``; the ids are 1-D read-only
    numpy arrays (``uint16``, or ``uint32`` for vocabularies over 65,536) mapping the cache file, so
    memory does not grow with the corpus. Raises :class:`AnexaError` for unusable data (one line) and
    for a corpus with too few tokens for ``block_size``.
    """
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
    if len(val_ids) <= block_size + 1:
        need = (block_size + 2) * 10
        raise AnexaError(
            f"corpus {corpora.data_label(train_config.data)} has {len(ids)} tokens, too few for block_size "
            f"{block_size}: use a text of at least {need} tokens or a smaller --block-size"
        )
    return corpus.name, tokenizer, options, train_ids, val_ids
