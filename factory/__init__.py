"""factory: seeds and principle files in; instruction data, preference pairs and a trained model out."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("factory")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+local"
