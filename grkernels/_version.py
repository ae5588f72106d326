"""The one version string of grkernels: pyproject.toml reads it at build time (``[tool.setuptools.dynamic]``),
``grkernels.__version__`` and ``grkernels --version`` report it."""

__version__ = "0.2.0"
