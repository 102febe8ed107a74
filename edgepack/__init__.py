"""edgepack: compress a small LLaMA-family model into a bundle that runs offline on a laptop."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("edgepack")  # one owner: pyproject.toml's version, through the package metadata
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
