"""Weight bytes a decode step reads, for edgepack ONNX graphs and llama.cpp GGUF files alike (issue #18's
"bytes per token"): a file's size also counts what a step does not read (a GGUF's tokenizer metadata, an ONNX
graph's protobuf and its cos/sin tables, of which a step reads one row).

    python benchmarks/weight_bytes.py BUNDLE/onnx/model.onnx GGUF_FILE ...

ONNX: the sum of the graph's initializers (external data included) less `cos_cache` / `sin_cache`. GGUF: the sum
of its tensors' bytes (needs the `gguf` package, which llama.cpp's converter brings: run it with the benchmark
environment's python for GGUF files).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROPE_TABLES = ("cos_cache", "sin_cache")


def onnx_weight_bytes(path: Path) -> int:
    import numpy as np
    import onnx
    from onnx import helper

    model = onnx.load(str(path), load_external_data=False)
    total = 0
    for t in model.graph.initializer:
        if t.name not in ROPE_TABLES:
            itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
            total += int(np.prod(t.dims, dtype=np.int64)) * itemsize
    return total


def gguf_weight_bytes(path: Path) -> int:
    import gguf

    return sum(int(t.n_bytes) for t in gguf.GGUFReader(str(path)).tensors)


def main() -> int:
    for arg in sys.argv[1:]:
        path = Path(arg)
        if path.suffix == ".gguf":
            n, files = gguf_weight_bytes(path), [path]
        else:  # the graph and its external data file(s)
            n, files = onnx_weight_bytes(path), list(path.parent.glob(path.name + "*"))
        size = sum(f.stat().st_size for f in files)
        print(f"{n / 1e6:9.2f} MB weights per token  {size / 1e6:9.2f} MB file  {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
