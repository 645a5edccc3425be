"""Build configuration beyond pyproject.toml: the optional gramine-pf accelerator (C, OpenSSL).

It needs a C compiler and OpenSSL 3 headers (Debian: libssl-dev). Where either is missing the
build skips it with a warning and shieldml uses its pure-Python reader (same results, slower).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "shieldml.files._pfnative",
            ["src/shieldml/files/_pfnative.c"],
            libraries=["crypto"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Werror=implicit-function-declaration"],
            optional=True,
        )
    ]
)
