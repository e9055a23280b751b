"""The version of jobctl (and jobd): pyproject.toml says the same (tests/test_installed.py)."""

__version__ = "0.1.0"
