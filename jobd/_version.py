"""The version of jobd (and jobctl): pyproject.toml says the same (tests/test_installed.py)."""

__version__ = "0.1.0"
