"""Sampling as a chain of logits processors, and stop strings for streamed text.

Processors are plugins (``register_samplers``), looked up by name, so a third-party distribution such
as ``anexa-topk`` adds ``-s top_k=40`` without touching the core. :func:`build_chain` turns the
command line's ``-s NAME[.OPTION][=VALUE]`` specs into instances; :class:`SamplerChain` runs them sorted
by their ``order``, ties by name (the built-ins document the order: repetition_penalty 10, temperature 20,
top_k 30, top_p 40, min_p 50, greedy 90) and picks one token per row.
"""

from __future__ import annotations

import re
from collections.abc import Generator, Iterable, Sequence

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
    knows. Samplers keep their command-line order; an option given twice keeps the last value.
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
        options[key] = match["value"].strip()
    return parsed


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
            given = {described[0].name if key == FIRST_OPTION else key: value for key, value in given.items()}
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

    def __repr__(self) -> str:
        return " → ".join(map(repr, self.processors)) or "sample at temperature 1"

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
        logits = self.process(logits, context)
        if torch.isnan(logits).any():
            raise AnexaError(f"the sampling chain {self!r} produced NaN: a sampler plugin is broken; leave it out")
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

    A chain with a ``process`` method (a :class:`SamplerChain`) only processes its row; the processed rows
    are then drawn together — one softmax, each row's draw from its own generator, one argmax and one
    device sync for them all instead of a chain of small operations and syncs per row. The draw is
    :func:`torch.multinomial`'s for one sample (``argmax(p / q)``, ``q`` exponential noise from the
    generator), so the ids are those of ``pick``; a row left with one token takes it without touching its
    generator. A chain with only ``pick``, and a row whose processed logits are broken (NaN, no token
    left), are picked by ``chain.pick`` on their own, which raises the error naming its chain.
    """
    processed = {}
    for row, chain in enumerate(chains):
        if hasattr(chain, "process"):
            processed[row] = chain.process(logits[row : row + 1], contexts[row])
    drawn: dict[int, int] = {}
    if processed:
        batch = torch.cat(list(processed.values())).float()
        broken = batch.isnan().any(-1)
        certain = batch == float("inf")
        batch = torch.where(certain.any(-1, keepdim=True), torch.where(certain, 0.0, float("-inf")), batch)
        candidates = torch.where(broken, 0, (batch > float("-inf")).sum(-1)).tolist()
        probs = batch.softmax(-1)
        noise = torch.ones_like(probs)  # a row with one candidate: its argmax, its generator untouched
        for index, (row, count) in enumerate(zip(processed, candidates, strict=True)):
            if count > 1:
                noise[index].exponential_(generator=generators[row])
        for row, count, pick in zip(processed, candidates, (probs / noise).argmax(-1).tolist(), strict=True):
            if count > 0:  # none left, or NaN: the chain's own pick below raises its error
                drawn[row] = pick
    return [
        drawn[row]
        if row in drawn
        else int(chain.pick(logits[row : row + 1], contexts[row], generators[row]).view(-1)[0])
        for row, chain in enumerate(chains)
    ]


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


def stream_until_stop(pieces: Iterable[str], stops: Sequence[str]) -> Generator[str, None, None]:
    """Yield streamed text until a stop string appears, even across pieces; no stops → pieces unchanged.

    It stops pulling from ``pieces`` at the stop, so a lazy generator of decoded tokens stops generating.
    """
    if not stops:
        yield from pieces
        return
    matcher = StopStrings(stops)
    for piece in pieces:
        text = matcher.feed(piece)
        if text:
            yield text
        if matcher.stopped:
            return
    tail = matcher.flush()
    if tail:
        yield tail
