"""edgepack compressor: the five stages (depth, width, LoRA, GPTQ, EoRA), recipes and the pipeline."""
