"""The package version: the one place it is written (packaging reads it here)."""

__version__ = "0.1.0"
