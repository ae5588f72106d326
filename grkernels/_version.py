"""The one version string of grkernels (read by setup.py and pyproject.toml)."""

__version__ = "0.1.0"
