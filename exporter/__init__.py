"""edgepack exporter: LoRA merge, safetensors and ONNX bundle writing, reference logits, manifest."""
