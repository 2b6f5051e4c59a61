"""The package version, a leaf: modules that record it (run folders, exports, results) import it from
here rather than from the package's ``__init__``, which loads them lazily."""

__version__ = "0.1.0"
