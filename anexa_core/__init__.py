"""Anexa's core: the plugin contract and the flow config → data → model → train → checkpoint → generate.

Everything a plugin needs is importable from here (``__all__``): ``hookimpl``, ``AnexaError``, the
interfaces, ``KVCache`` and ``ModelConfig`` for blocks, ``RemoteText`` and ``LocalText`` for datasets.
The conformance kit lives in :mod:`anexa_core.testing`. Names that need torch load on first use, so
``import anexa_core`` stays light (``anexa --help`` imports no torch).
"""

from importlib import import_module

from anexa_core.errors import AnexaError
from anexa_core.hookspecs import hookimpl
from anexa_core.interfaces import Attention, Blocks, Dataset, Optimizer, Sampler, Tokenizer

_LAZY = {
    "KVCache": "anexa_core.model.cache",
    "ModelConfig": "anexa_core.config",
    "TrainConfig": "anexa_core.config",
    "RemoteText": "anexa_core.data.corpus",
    "LocalText": "anexa_core.data.corpus",
    "Collection": "anexa_core.data.corpus",
    "normalize_text": "anexa_core.data.corpus",
}

__all__ = [
    "AnexaError",
    "Attention",
    "Blocks",
    "Collection",
    "Dataset",
    "KVCache",
    "LocalText",
    "ModelConfig",
    "Optimizer",
    "RemoteText",
    "Sampler",
    "Tokenizer",
    "TrainConfig",
    "hookimpl",
    "normalize_text",
]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'anexa_core' has no attribute {name!r}")
