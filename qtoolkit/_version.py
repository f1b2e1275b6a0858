"""The version of qtoolkit (a leaf module: safe to import from any layer; ``pyproject.toml`` holds the same value)."""

__version__ = "0.1.0"
