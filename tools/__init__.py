"""The `zoom` tool for agent frameworks (`qzoom.tools`): schemas and zoom-call parsers, importing no torch."""
