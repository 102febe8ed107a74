"""edgepack: compress a small LLaMA-family model into a bundle that runs offline on a laptop."""

__version__ = "0.1.0"
