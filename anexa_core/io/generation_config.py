"""A pretrained model's recommended sampling: what its makers ship beside the weights, kept with the run.

``anexa import`` reads it from transformers' ``generation_config.json`` (``do_sample``, ``temperature``,
``top_k``, ``top_p``, ``min_p``, ``repetition_penalty``) or from a GGUF file's ``general.sampling.*`` keys
(llama.cpp's: ``temp``, ``top_k``, ``top_p``, ``min_p``, ``penalty_repeat``, ``penalty_last_n``) and records
it as the ``generation`` entry of the run's ``imported_from``, so fine-tunes inherit it with their origin.
``generate``, ``chat`` and ``serve`` sample with it when the user (or the request) chooses no sampling at
all — any ``--temperature``, ``-s``, ``temperature``, ``top_p`` or ``anexa.samplers`` replaces it whole, so
there is one rule and no merge — and ``anexa export`` writes it back in either format.

The record uses transformers' names, plus ``repetition_penalty_window`` (GGUF's ``penalty_last_n``; absent:
the whole context, as transformers applies the penalty). transformers samples only with ``do_sample: true``,
and then with its defaults for what the file leaves out (temperature 1, top_k 50, top_p 1); a file without
``do_sample`` that still names sampling values is taken at its word (llama.cpp's converter does the same).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from anexa_core import plugins

logger = logging.getLogger("anexa")

HF_SAMPLING_DEFAULTS: dict[str, Any] = {"temperature": 1.0, "top_k": 50, "top_p": 1.0}
"""transformers' ``GenerationConfig`` defaults that apply when a file says ``do_sample: true``."""
LLAMA_CPP_PENALTY_WINDOW = 64
"""llama.cpp's ``penalty_last_n`` when a GGUF file gives a repetition penalty without it."""

# Each recorded field: its type and the values it may take (anything else in a file is left out, with a warning).
_FIELDS: dict[str, tuple[type, Any]] = {
    "temperature": (float, lambda v: v >= 0),
    "top_k": (int, lambda v: v >= 0),
    "top_p": (float, lambda v: 0 < v <= 1),
    "min_p": (float, lambda v: 0 <= v <= 1),
    "repetition_penalty": (float, lambda v: v > 0),
    "repetition_penalty_window": (int, lambda v: v >= -1),
}
GGUF_KEYS = {
    "temperature": "general.sampling.temp",
    "top_k": "general.sampling.top_k",
    "top_p": "general.sampling.top_p",
    "min_p": "general.sampling.min_p",
    "repetition_penalty": "general.sampling.penalty_repeat",
    "repetition_penalty_window": "general.sampling.penalty_last_n",
}
"""The record's fields and the GGUF keys that hold them (``gguf.Keys.General.SAMPLING_*``)."""


def _valid(values: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The fields of ``values`` that are numbers in range, as their field's type; the rest left out, named
    in a warning (a model file's odd value should not stop its import)."""
    record: dict[str, Any] = {}
    for field, (kind, allowed) in _FIELDS.items():
        value = values.get(field)
        if value is None:
            continue
        number = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        if number and (kind is float or float(value).is_integer()) and allowed(kind(value)):
            record[field] = kind(value)
        else:
            logger.warning("%s: %s = %r is not a usable sampling setting; left out", where, field, value)
    return record


HF_NOT_APPLIED: dict[str, Any] = {
    "num_beams": 1,
    "typical_p": 1.0,
    "no_repeat_ngram_size": 0,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "encoder_repetition_penalty": 1.0,
    "penalty_alpha": None,
    "max_new_tokens": None,
}
"""``generation_config.json`` entries that change what transformers generates but that Anexa does not apply
(beam search, typical sampling, n-gram blocking, a length of its own), each with its value that changes
nothing: any other is named in a warning at import, never dropped without a word."""


def from_hf(generation: Mapping[str, Any]) -> dict[str, Any]:
    """The record of a ``generation_config.json``'s entries; ``{}`` when it names no sampling.
    ``do_sample: false`` is greedy, with the repetition penalty transformers applies to greedy search too.
    Entries of :data:`HF_NOT_APPLIED` away from their neutral value are named in a warning."""
    ignored = [
        f"{key} = {generation[key]!r}"
        for key, neutral in HF_NOT_APPLIED.items()
        if generation.get(key) is not None and generation[key] != neutral
    ]
    if ignored:
        logger.warning(
            "generation_config.json: %s not applied (Anexa samples with temperature, top_k, top_p, min_p and "
            "repetition_penalty; the length is -n or max_tokens)",
            ", ".join(ignored),
        )
    record = _valid(generation, "generation_config.json")
    record.pop("repetition_penalty_window", None)  # not a transformers field
    if generation.get("do_sample") is False:
        return {"do_sample": False, **_penalty(record)}
    if generation.get("do_sample") is True:
        return {"do_sample": True, **HF_SAMPLING_DEFAULTS, **record}
    return record


def _penalty(record: Mapping[str, Any]) -> dict[str, Any]:
    return {field: record[field] for field in ("repetition_penalty", "repetition_penalty_window") if field in record}


def from_gguf(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """The record of a GGUF file's ``general.sampling.*`` entries (float32 values as the shortest decimal
    that is the same float32); ``{}`` when it has none. ``penalty_last_n`` -1 is the whole context, 0 turns
    the penalty off, and without it a penalty looks back :data:`LLAMA_CPP_PENALTY_WINDOW` tokens."""
    from anexa_core.io.gguf import tidy_float

    values = {field: metadata.get(key) for field, key in GGUF_KEYS.items()}
    for field, value in values.items():
        if isinstance(value, float) and _FIELDS[field][0] is float:
            values[field] = tidy_float(value)
    record = _valid(values, "general.sampling")
    window = record.pop("repetition_penalty_window", LLAMA_CPP_PENALTY_WINDOW)
    if window == 0:
        record.pop("repetition_penalty", None)
    elif "repetition_penalty" in record and window > 0:
        record["repetition_penalty_window"] = window
    if record.get("top_k") == 1:  # llama.cpp's greedy
        return {"do_sample": False, **_penalty(record)}
    return record


def to_hf(record: Mapping[str, Any]) -> dict[str, Any]:
    """``generation_config.json`` entries for ``record``: ``do_sample`` and the values transformers reads
    (a GGUF file's penalty window has no transformers field: there the penalty covers the whole context)."""
    if not record:
        return {}
    if record.get("do_sample") is False:
        return {"do_sample": False, **{k: v for k, v in record.items() if k == "repetition_penalty"}}
    entries = {"do_sample": True, "top_k": 0}  # transformers' top_k 50 applies only where the record says so
    entries.update({field: record[field] for field in HF_FIELDS if field in record})
    return entries


HF_FIELDS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")
"""The record's fields that transformers' ``GenerationConfig`` has."""


def to_gguf(record: Mapping[str, Any]) -> dict[str, Any]:
    """The record's fields as a GGUF file holds them (keys of :data:`GGUF_KEYS`; llama.cpp's meaning:
    greedy is ``top_k`` 1, and a penalty without a window covers the whole context, ``penalty_last_n`` -1)."""
    greedy = record.get("do_sample") is False
    kept = _penalty(record) if greedy else record
    fields = {field: kept[field] for field in GGUF_KEYS if field in kept}
    if greedy:
        fields["top_k"] = 1
    if "repetition_penalty" in record and "repetition_penalty_window" not in record:
        fields["repetition_penalty_window"] = -1
    return fields


@dataclass(frozen=True)
class Recommended:
    """The sampler specs (``-s`` syntax) for a model's recommended sampling, in chain order (``every``), and
    those among them that no installed sampler plugin provides (``missing``: ``top_k`` comes with the
    ``anexa-topk`` example plugin)."""

    every: list[str]
    missing: list[str]

    @property
    def specs(self) -> list[str]:
        """The specs to sample with here: ``every`` but the ``missing``."""
        return [spec for spec in self.every if spec not in self.missing]

    def describe(self) -> str:
        """One line for the user, e.g. ``temperature=0.6 → top_p=0.95 (top_k=20 left out: …)``."""
        shown = " → ".join(self.specs) or "plain sampling at temperature 1"
        if self.missing:
            names = sorted({_sampler(spec) for spec in self.missing})
            shown += f" ({', '.join(self.missing)} left out: no {' or '.join(names)} sampler is installed)"
        return shown


def recommended(record: Mapping[str, Any] | None, context: int) -> Recommended | None:
    """Sampler specs for ``record`` on a model of ``context`` positions, in chain order; ``None`` when the
    model recommends nothing. Values that change nothing (temperature 1, top_k 0, top_p 1, min_p 0, a
    penalty of 1) are left out; ``do_sample: false`` (or ``top_k`` 1) is ``greedy``, after the penalty."""
    specs = _specs(record or {}, context)
    if not specs:
        return None
    installed = plugins.registered("samplers")
    return Recommended(specs, [spec for spec in specs if _sampler(spec) not in installed])


def _sampler(spec: str) -> str:
    """The sampler a spec names: ``repetition_penalty`` for ``repetition_penalty.window=64``."""
    return spec.split("=")[0].split(".")[0]


def _specs(record: Mapping[str, Any], context: int) -> list[str]:
    specs: list[str] = []
    penalty = record.get("repetition_penalty")
    if penalty is not None and penalty != 1:
        window = min(record.get("repetition_penalty_window") or context, context)
        specs += [f"repetition_penalty={penalty!r}", f"repetition_penalty.window={window}"]
    if record.get("do_sample") is False or record.get("top_k") == 1:  # one token left: the rest change nothing
        return [*specs, "greedy"]
    if record.get("temperature", 1.0) != 1:
        specs.append(f"temperature={record['temperature']!r}")
    if record.get("top_k", 0) > 0:
        specs.append(f"top_k={record['top_k']}")
    if record.get("top_p", 1.0) < 1:
        specs.append(f"top_p={record['top_p']!r}")
    if record.get("min_p", 0.0) > 0:
        specs.append(f"min_p={record['min_p']!r}")
    return specs
