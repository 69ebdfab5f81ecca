"""kvtune: a hardware-aware auto-tuner and policy advisor for the KV cache of LLM inference."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("kvtune")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
