"""Sampling as a chain of logits processors, and stop strings for streamed text.

Processors are plugins (``register_samplers``), looked up by name, so a third-party distribution such
as ``anexa-topk`` adds ``-s top_k=40`` without touching the core. :func:`build_chain` turns the
command line's ``-s NAME[.OPTION][=VALUE]`` specs into instances; :class:`SamplerChain` runs them sorted
by their ``order``, ties by name (the built-ins document the order: repetition_penalty 10, temperature 20,
top_k 30, top_p 40, min_p 50, greedy 90) and picks one token per row.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import torch

from anexa_core import options, plugins
from anexa_core.errors import AnexaError
from anexa_core.interfaces import Sampler

FIRST_OPTION = ""
"""Key in :func:`parse_sampler_options` results for ``-s NAME=VALUE``: the sampler's first field."""

_SPEC = re.compile(r"(?P<name>[A-Za-z_][\w-]*)(?:\.(?P<option>[A-Za-z_]\w*))?(?:=(?P<value>.*))?", re.DOTALL)


def parse_sampler_options(specs: Iterable[str]) -> dict[str, dict[str, str]]:
    """Command-line specs → options per sampler, values still text.

    ``["top_k=40", "top_p.p=0.9", "greedy"]``
    → ``{"top_k": {"": "40"}, "top_p": {"p": "0.9"}, "greedy": {}}``.

    The key ``""`` (:data:`FIRST_OPTION`) stands for the sampler's first field, which only the class
    knows. Samplers keep their command-line order. An option given twice is an error (one value would be
    dropped), as :func:`build_chain` finds ``-s top_p=0.9 -s top_p.p=0.8`` (both the first field).
    """
    parsed: dict[str, dict[str, str]] = {}
    for spec in specs:
        match = _SPEC.fullmatch(spec.strip())
        if match is None or match["value"] == "":
            raise AnexaError(
                f"bad sampler spec {spec!r}: use -s NAME, -s NAME=VALUE or -s NAME.OPTION=VALUE (e.g. -s top_p=0.9)"
            )
        options = parsed.setdefault(match["name"], {})
        if match["value"] is None:
            if match["option"] is not None:
                raise AnexaError(f"sampler option {spec!r} has no value: use -s {spec.strip()}=VALUE")
            continue
        key = match["option"] or FIRST_OPTION
        if key in options:
            raise _twice(match["name"], key or "its first option")
        options[key] = match["value"].strip()
    return parsed


def _twice(sampler: str, option: str) -> AnexaError:
    return AnexaError(f"sampler {sampler}: {option} is given twice: give it once")


def build_chain(specs: Iterable[str] = (), temperature: float | None = None) -> SamplerChain:
    """The processors named by ``-s`` specs, plus ``--temperature`` (the same as ``-s temperature=X``).

    Giving both ``--temperature`` and ``-s temperature...`` is an error rather than a silent override;
    pass ``temperature=None`` when the flag was not given. No specs means plain sampling at temperature 1.
    """
    parsed = parse_sampler_options(specs)
    if temperature is not None:
        if "temperature" in parsed:
            raise AnexaError("--temperature and -s temperature both set the temperature: give only one")
        parsed["temperature"] = {FIRST_OPTION: repr(float(temperature))}
    processors = []
    for name, given in parsed.items():
        factory = plugins.get("samplers", name)
        if not isinstance(getattr(factory, "order", None), int):
            raise AnexaError(f"sampler {name!r} has no int `order`: fix or uninstall its plugin (see `anexa plugins`)")
        if FIRST_OPTION in given:
            described = options.describe(factory)
            if not described:
                raise AnexaError(f"sampler {name} takes no options: use -s {name}")
            first = described[0].name
            if first in given:
                raise _twice(name, first)
            given = {first if key == FIRST_OPTION else key: value for key, value in given.items()}
        processor, _ = options.create(f"sampler {name}", factory, given)
        processors.append((name, processor))
    return SamplerChain(processors)


class SamplerChain:
    """Logits processors run by ``order``, ties by name (deterministic whatever the command line's order),
    then one pick per row."""

    def __init__(self, processors: Iterable[Sampler | tuple[str, Sampler]] = ()) -> None:
        named = [item if isinstance(item, tuple) else (type(item).__name__, item) for item in processors]
        named.sort(key=lambda pair: (pair[1].order, pair[0]))
        self.names = [name for name, _ in named]
        self.processors: list[Sampler] = [processor for _, processor in named]
        self.reads_context = any(getattr(processor, "reads_context", True) for processor in self.processors)

    def __repr__(self) -> str:
        return " → ".join(map(repr, self.processors)) or "sample at temperature 1"

    def __eq__(self, other: object) -> bool:
        """The same processors with the same options (the engine processes the rows of equal chains at once)."""
        return isinstance(other, SamplerChain) and (self.names, self.processors) == (other.names, other.processors)

    def __hash__(self) -> int:
        """By the processors' names: equal chains hash equal (their options, dataclasses, need not hash)."""
        return hash(tuple(self.names))

    def process(self, logits: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """``logits`` (B, V) and ``context`` (B, T) token ids → processed float32 logits, removed tokens at -inf."""
        logits = logits.float()
        for processor in self.processors:
            logits = processor(logits, context)
        return logits

    def pick(
        self, logits: torch.Tensor, context: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """The next token ids, shape (B, 1) int64.

        When the chain leaves one token in every row (temperature 0, greedy, top_k=1) this is the argmax
        and the generator is untouched; otherwise a multinomial draw from the softmax with ``generator``,
        which must live on the logits' device (``torch.Generator(device=logits.device).manual_seed(seed)``).
        A processor that breaks the contract with ``+inf`` makes those tokens the only candidates; NaN is
        an error naming the chain.
        """
        processed = self.process(logits, context)
        if torch.isnan(processed).any():
            if torch.isnan(logits).any():  # the model's own logits: no sampler is to blame
                raise AnexaError(
                    "the model computed NaN logits: its weights are broken (a training run that diverged?); "
                    "load another checkpoint"
                )
            raise AnexaError(f"the sampling chain {self!r} produced NaN: a sampler plugin is broken; leave it out")
        logits = processed
        certain = logits == float("inf")
        if certain.any():
            rows = certain.any(-1, keepdim=True)
            logits = torch.where(rows, torch.where(certain, 0.0, float("-inf")), logits)
        fewest, most = torch.stack((logits > float("-inf")).sum(-1).aminmax()).tolist()  # one device sync
        if fewest == 0:
            raise AnexaError(f"the sampling chain {self!r} removed every token: loosen its options")
        if most == 1:
            return logits.argmax(-1, keepdim=True)
        return torch.multinomial(logits.softmax(-1), 1, generator=generator)


def pick_rows(
    chains: Sequence, logits: torch.Tensor, contexts: Sequence[torch.Tensor], generators: Sequence
) -> list[int]:
    """The next id of every row of ``logits`` (rows, V): row ``i`` by ``chains[i]`` with ``contexts[i]``
    (1, T) and ``generators[i]``, the id ``chains[i].pick(logits[i : i + 1], contexts[i], generators[i])``
    gives — how the engine picks the tokens of all its requests, each with its own chain and generator.

    Chains with a ``process`` method (:class:`SamplerChain`) are not asked to pick: the rows of equal chains
    are processed at once (:func:`_groups`), then every processed row is drawn together — one softmax,
    each row's noise from its own generator, one argmax and one device sync for them all (:func:`_draw`),
    instead of a chain of small operations and syncs per row. A chain with only ``pick``, and a row whose
    processed logits are broken (NaN, no token left), are picked by ``chain.pick`` on their own, which
    raises the error naming its chain.
    """
    groups = _groups(chains, contexts)
    rows = [row for group in groups for row in group]
    processed = [_process(chains, group, logits, contexts) for group in groups]
    drawn = _draw(torch.cat(processed) if len(processed) > 1 else processed[0], rows, generators) if rows else []
    picks = dict(zip(rows, drawn, strict=True))
    return [
        pick
        if (pick := picks.get(row)) is not None
        else int(chain.pick(logits[row : row + 1], contexts[row], generators[row]).view(-1)[0])
        for row, chain in enumerate(chains)
    ]


def _groups(chains: Sequence, contexts: Sequence[torch.Tensor]) -> list[list[int]]:
    """The rows whose chain has ``process``, grouped to be processed at once: equal chains, and for a chain
    that reads the context (``reads_context``, true unless the chain says otherwise) contexts of one
    length, so they stack."""
    groups: list[list[int]] = []
    for row, chain in enumerate(chains):
        if not hasattr(chain, "process"):
            continue
        reads = getattr(chain, "reads_context", True)
        for group in groups:
            first = group[0]
            if chains[first] == chain and (not reads or contexts[first].size(-1) == contexts[row].size(-1)):
                group.append(row)
                break
        else:
            groups.append([row])
    return groups


def _process(chains: Sequence, rows: list[int], logits: torch.Tensor, contexts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Rows ``rows`` of ``logits`` (of equal chains) processed, (len(rows), V): by their chain at once —
    with an empty context if it reads none — or, for a single row or when that raises (a chain may fail
    one row only), each by its own chain."""
    chain = chains[rows[0]]
    if len(rows) > 1:
        if getattr(chain, "reads_context", True):
            context = torch.cat([contexts[row] for row in rows])
        else:
            context = contexts[rows[0]].new_zeros(len(rows), 0)
        try:
            return chain.process(logits if len(rows) == len(logits) else logits[rows], context)
        except Exception:
            pass  # each row by its own chain below: a row that fails raises there, as its own
    return torch.cat([chains[row].process(logits[row : row + 1], contexts[row]) for row in rows])


def _draw(logits: torch.Tensor, rows: list[int], generators: Sequence) -> list[int | None]:
    """One id per row of processed ``logits`` (len(rows), V), drawn with ``generators[rows[i]]`` as
    ``torch.multinomial`` draws one sample: ``argmax(p / q)``, ``q`` exponential noise from the generator
    (so the ids, and what each generator draws, are :meth:`SamplerChain.pick`'s), in the order of ``rows``
    (rows without a seed share torch's global generator). A row left with one token (or ``+inf`` on one)
    takes it without touching its generator; ``None`` for a broken row (NaN, no token left)."""
    logits = logits.float()
    broken = logits.isnan().any(-1)
    certain = logits == float("inf")
    logits = torch.where(certain.any(-1, keepdim=True), torch.where(certain, 0.0, float("-inf")), logits)
    candidates = torch.where(broken, 0, (logits > float("-inf")).sum(-1)).tolist()
    probs = logits.softmax(-1)
    noise = torch.ones_like(probs)
    for index in sorted(range(len(rows)), key=rows.__getitem__):
        if candidates[index] > 1:
            noise[index].exponential_(generator=generators[rows[index]])
    drawn = (probs / noise).argmax(-1).tolist()
    return [pick if count > 0 else None for pick, count in zip(drawn, candidates, strict=True)]


class StopStrings:
    """Incremental stop-string matcher for streamed text.

    ``feed`` returns the text that can safely be shown: text that could still be the start of a stop
    string is held back until the next piece settles it. Once a stop string appears, ``stopped`` is
    true and neither the stop string nor anything after it is ever returned.

    **The text before a stop is never blank.** A stop string counts only where the text before it holds
    something other than whitespace: one the model writes first — ``\\n\\n`` or ``User:`` right after a
    chat's ``Assistant:`` — is kept as text and the generation goes on to the next one. So a reply is
    never empty, or only spaces and newlines, because of a stop string (it can still be short, or end
    at the token limit).
    """

    def __init__(self, stops: Sequence[str] = ()) -> None:
        if any(stop == "" for stop in stops):
            raise AnexaError("--stop needs a non-empty string")
        self.stops = tuple(stops)
        self.stopped = False
        self._held = ""
        self._visible = False  # whether the text released so far holds a non-whitespace character

    def feed(self, piece: str) -> str:
        """Add the next piece of text; returns what may be shown now (possibly "")."""
        if self.stopped:
            return ""
        self._held += piece
        return self._release(final=False)

    def flush(self) -> str:
        """The stream ended: release what was held back (it can no longer become a stop string)."""
        if self.stopped:
            return ""
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        text = self._held
        floor = 0
        if not self._visible:  # a stop counts only after the first non-whitespace character
            first = next((index for index, char in enumerate(text) if not char.isspace()), None)
            if first is None:  # blank so far: no stop can count in it yet
                self._held = ""
                return text
            floor = first + 1
        found = [index for index in (text.find(stop, floor) for stop in self.stops) if index >= 0]
        first_stop = min(found) if found else None
        partial = None if final else self._partial_start(text, floor)
        # A stop string found later than an unfinished one might still be preceded by it: wait.
        if first_stop is not None and (partial is None or partial >= first_stop):
            self.stopped = True
            self._held = ""
            return text[:first_stop]
        cut = len(text) if partial is None else partial
        self._held = text[cut:]
        self._visible = self._visible or floor > 0  # the first visible character is before ``cut``
        return text[:cut]

    def _partial_start(self, text: str, floor: int = 0) -> int | None:
        """Earliest index from ``floor`` on from which the rest of ``text`` is a proper prefix of some stop
        string."""
        longest = max((len(stop) for stop in self.stops), default=0)
        for start in range(max(floor, len(text) - longest + 1), len(text)):
            tail = text[start:]
            if any(len(stop) > len(tail) and stop.startswith(tail) for stop in self.stops):
                return start
        return None
