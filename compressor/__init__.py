"""edgepack compressor: the five stages (depth, width, LoRA, GPTQ, EoRA), recipes and the pipeline."""

import logging as _logging

# torchao (pulled in by gptqmodel) logs a warning for every optional CUDA extension it cannot load on a
# CPU machine, and torch logs a deprecation note for each of its enums; neither is actionable for a user.
for _name in ("torchao", "torchao.kernel.intmm", "torch.utils._pytree"):
    _logging.getLogger(_name).setLevel(_logging.ERROR)
