"""Build script. Package metadata lives in pyproject.toml.

Native kernels under csrc/ will be compiled here (torch.utils.cpp_extension) when they land;
until then this is a pure-Python package and `pip install -e ".[dev]"` needs no compiler.
"""

from setuptools import setup

setup()
