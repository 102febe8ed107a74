"""edgepack runtime: open, verify, run and measure a bundle.

Standalone by design: this package imports only onnxruntime, numpy, tokenizers, safetensors,
jinja2 and rich (never torch, transformers, peft or gptqmodel), so a laptop can run a bundle
with a small install. Everything else in edgepack may import from here, never the reverse.
"""
