"""The package version (one place, read by pyproject via setuptools)."""

__version__ = "0.1.0"
