"""The package version (its own module: the transport reports it without importing the package)."""

__version__ = "0.2.0"
