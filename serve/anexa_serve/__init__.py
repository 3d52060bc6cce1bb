"""``anexa_serve``: Anexa models behind an OpenAI-compatible HTTP API and a chat page.

An interface layer like the CLI: it parses requests, submits them to the core's one inference engine
(one per served model, stepped by one thread: continuous batching) and formats answers.
:func:`create_app` builds the ASGI app from models loaded with :func:`load_models`; ``anexa serve``
runs it under uvicorn. See ``docs/serve.md``.
"""

from anexa_serve.app import ServeConfig, create_app
from anexa_serve.models import ServedModel, load_models, unique_names

__all__ = ["ServeConfig", "ServedModel", "create_app", "load_models", "unique_names"]
