"""Anexa's core: the plugin contract and the flow config → data → model → train → checkpoint → generate.

Plugin authors need only ``hookimpl`` and the interfaces in :mod:`anexa_core.interfaces`.
"""

from anexa_core.errors import AnexaError
from anexa_core.hookspecs import hookimpl

__all__ = ["AnexaError", "hookimpl"]
