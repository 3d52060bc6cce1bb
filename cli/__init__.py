"""Anexa command line."""
