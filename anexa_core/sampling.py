"""Sampling as a chain of logits processors, and stop strings for streamed text.

Processors are plugins (``register_samplers``), looked up by name, so a third-party distribution such
as ``anexa-topk`` adds ``-s top_k=40`` without touching the core. :func:`build_chain` turns the
command line's ``-s NAME[.OPTION][=VALUE]`` specs into instances; :class:`SamplerChain` runs them sorted
by their ``order`` (the built-ins document the order: repetition_penalty 10, temperature 20, top_k 30,
top_p 40, min_p 50, greedy 90) and picks one token per row.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch

from anexa_core import plugins
from anexa_core.errors import AnexaError
from anexa_core.interfaces import Sampler

FIRST_OPTION = ""
"""Key in :func:`parse_sampler_options` results for ``-s NAME=VALUE``: the sampler's first field."""

_SPEC = re.compile(r"(?P<name>[A-Za-z_][\w-]*)(?:\.(?P<option>[A-Za-z_]\w*))?(?:=(?P<value>.*))?", re.DOTALL)
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


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
                f"bad sampler spec {spec!r}: use -s NAME, -s NAME=VALUE or -s NAME.OPTION=VALUE "
                "(e.g. -s top_p=0.9)"
            )
        options = parsed.setdefault(match["name"], {})
        if match["value"] is None:
            if match["option"] is not None:
                raise AnexaError(f"sampler option {spec!r} has no value: use -s {spec.strip()}=VALUE")
            continue
        key = match["option"] or FIRST_OPTION
        options.pop(key, None)  # re-insert so the last value given is also the last applied
        options[key] = match["value"].strip()
    return parsed


def _convert(sampler: str, option: str, kind: Any, text: str) -> Any:
    """A command-line string as the field's type; other annotations get the string unchanged."""
    try:
        if kind is bool:
            lowered = text.lower()
            if lowered not in _TRUE | _FALSE:
                raise ValueError
            return lowered in _TRUE
        if kind is int:
            return int(text)
        if kind is float:
            return float(text)
    except ValueError:
        wanted = {bool: "true or false", int: "an integer", float: "a number"}[kind]
        raise AnexaError(f"sampler {sampler} option {option} must be {wanted}, got {text!r}") from None
    return text


def _instantiate(name: str, cls: Any, options: dict[str, str]) -> Sampler:
    if not dataclasses.is_dataclass(cls) or not isinstance(getattr(cls, "order", None), int):
        raise AnexaError(
            f"sampler {name!r} is not a dataclass with an int `order`: "
            "fix or uninstall its plugin (see `anexa plugins`)"
        )
    fields = [field for field in dataclasses.fields(cls) if field.init]
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # an annotation that does not resolve: fall back to the raw field types
        hints = {}
    by_name = {field.name: field for field in fields}
    values: dict[str, Any] = {}
    for key, text in options.items():
        if key == FIRST_OPTION:
            if not fields:
                raise AnexaError(f"sampler {name} takes no options: use -s {name}")
            key = fields[0].name
        if key not in by_name:
            choices = ", ".join(by_name) or "none"
            raise AnexaError(f"sampler {name} has no option {key!r}: choose one of {choices}")
        values[key] = _convert(name, key, hints.get(key, by_name[key].type), text)
    return cls(**values)


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
    available = plugins.registered("samplers")
    processors = []
    for name, options in parsed.items():
        if name not in available:
            choices = ", ".join(sorted(available)) or "none"
            raise AnexaError(
                f"unknown sampler {name!r}: choose one of {choices} (plugins add more; see `anexa plugins`)"
            )
        processors.append(_instantiate(name, available[name].obj, options))
    return SamplerChain(processors)


class SamplerChain:
    """Logits processors run in ``order`` (ties keep their given order), then one pick per row."""

    def __init__(self, processors: Iterable[Sampler] = ()) -> None:
        self.processors: list[Sampler] = sorted(processors, key=lambda processor: processor.order)

    def __repr__(self) -> str:
        return " → ".join(map(repr, self.processors)) or "sample at temperature 1"

    def process(self, logits: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """``logits`` (B, V) and ``context`` (B, T) token ids → processed logits, removed tokens at -inf."""
        for processor in self.processors:
            logits = processor(logits, context)
        return logits

    def pick(
        self, logits: torch.Tensor, context: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """The next token ids, shape (B, 1).

        When the chain leaves one token per row (temperature 0, greedy, top_k=1) this is the argmax and
        the generator is untouched; otherwise a multinomial draw with ``generator``, which must live on
        the logits' device (``torch.Generator(device=logits.device).manual_seed(seed)``).
        """
        logits = self.process(logits, context)
        fewest, most = torch.stack((logits > float("-inf")).sum(-1).aminmax()).tolist()  # one device sync
        if fewest == 0:
            raise AnexaError(f"the sampling chain {self!r} removed every token: loosen its options")
        if most == 1:
            return logits.argmax(-1, keepdim=True)
        return torch.multinomial(logits.float().softmax(-1), 1, generator=generator)


class StopStrings:
    """Incremental stop-string matcher for streamed text.

    ``feed`` returns the text that can safely be shown: text that could still be the start of a stop
    string is held back until the next piece settles it. Once a stop string appears, ``stopped`` is
    true and neither the stop string nor anything after it is ever returned.
    """

    def __init__(self, stops: Sequence[str] = ()) -> None:
        if any(stop == "" for stop in stops):
            raise AnexaError("--stop needs a non-empty string")
        self.stops = tuple(stops)
        self.stopped = False
        self._held = ""

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
        found = [index for index in (text.find(stop) for stop in self.stops) if index >= 0]
        first_stop = min(found) if found else None
        partial = None if final else self._partial_start(text)
        # A stop string found later than an unfinished one might still be preceded by it: wait.
        if first_stop is not None and (partial is None or partial >= first_stop):
            self.stopped = True
            self._held = ""
            return text[:first_stop]
        cut = len(text) if partial is None else partial
        self._held = text[cut:]
        return text[:cut]

    def _partial_start(self, text: str) -> int | None:
        """Earliest index from which the rest of ``text`` is a proper prefix of some stop string."""
        longest = max((len(stop) for stop in self.stops), default=0)
        for start in range(max(0, len(text) - longest + 1), len(text)):
            tail = text[start:]
            if any(len(stop) > len(tail) and stop.startswith(tail) for stop in self.stops):
                return start
        return None


def stream_until_stop(pieces: Iterable[str], stops: Sequence[str]) -> Iterator[str]:
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
