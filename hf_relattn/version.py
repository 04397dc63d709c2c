"""The package version, in a module of its own: the modules that record it (provenance files,
bench results, model cards) import it from here rather than from the package `__init__`, which
imports them."""

__version__ = "0.1.0"
