"""The whole plugin contract: one ``register_*`` hook per extension point.

Each hook receives ``register(name, obj)``; a plugin calls it once per implementation it offers.
Names are global per hook: two plugins registering the same name is an error naming both.
The objects registered must satisfy the matching interface in :mod:`anexa_core.interfaces`.
"""

import pluggy

hookspec = pluggy.HookspecMarker("anexa")
hookimpl = pluggy.HookimplMarker("anexa")


@hookspec
def register_tokenizers(register):
    """Register tokenizer classes (:class:`~anexa_core.interfaces.Tokenizer`): ``register("char", CharTokenizer)``."""


@hookspec
def register_attention(register):
    """Register attention functions (:class:`~anexa_core.interfaces.Attention`): ``register("sdpa", fn)``."""


@hookspec
def register_samplers(register):
    """Register logits processors (:class:`~anexa_core.interfaces.Sampler`): ``register("top_k", TopK)``."""


@hookspec
def register_blocks(register):
    """Register model families (:class:`~anexa_core.interfaces.Blocks`): ``register("gpt2", build_gpt2)``."""


@hookspec
def register_datasets(register):
    """Register text corpora (:class:`~anexa_core.interfaces.Dataset`): ``register("sherlock", RemoteText(...))``."""
