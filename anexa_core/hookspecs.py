"""The whole plugin contract: one ``register_*`` hook per kind of plugin.

Each hook receives ``register(name, factory)``; a plugin calls it once per implementation it offers.
A factory is called with the user's options as keyword arguments (a dataclass whose fields are the
options is the usual form, see :mod:`anexa_core.options`) and returns the object that does the work,
which satisfies the kind's interface in :mod:`anexa_core.interfaces`. Names are global per kind: two
plugins registering one name is reported (naming both) when that name is used.
"""

import pluggy

hookspec = pluggy.HookspecMarker("anexa")
hookimpl = pluggy.HookimplMarker("anexa")


@hookspec
def register_tokenizers(register):
    """Register tokenizers (:class:`~anexa_core.interfaces.Tokenizer`): ``register("bpe", BPETokenizer)``."""


@hookspec
def register_attention(register):
    """Register attention functions (:class:`~anexa_core.interfaces.Attention`): ``register("sdpa", SDPA)``."""


@hookspec
def register_samplers(register):
    """Register logits processors (:class:`~anexa_core.interfaces.Sampler`): ``register("top_k", TopK)``."""


@hookspec
def register_blocks(register):
    """Register model families (:class:`~anexa_core.interfaces.Blocks`): ``register("llama", Llama)``."""


@hookspec
def register_datasets(register):
    """Register corpora (:class:`~anexa_core.interfaces.Dataset`): ``register("sherlock", sherlock)``."""


@hookspec
def register_optimizers(register):
    """Register optimizers (:class:`~anexa_core.interfaces.Optimizer`): ``register("adamw", AdamW)``."""
