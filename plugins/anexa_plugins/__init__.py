"""Anexa's built-in plugins. Each module is a plugin of the same shape a third-party one has."""
