"""Builds the optional compiled plane coder; everything else is in pyproject.toml.

``optional=True``: where no C compiler is found, the install still succeeds and
weightbank codes byte planes with numpy instead (the same bytes, slower).
"""

import sys

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "weightbank.format._cplanes",
            ["src/weightbank/format/_cplanes.c"],
            optional=True,
            extra_compile_args=[] if sys.platform == "win32" else ["-O3"],
        )
    ]
)
