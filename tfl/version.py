"""tfl's version, in a leaf module so that the core can record it without importing the package's API."""

__version__ = "0.1.0"
