"""lorachain: fine-tune and serve language models with chains of LoRA adapters."""

import logging as _logging

__version__ = "0.1.0"

# bitsandbytes, on a CPU with AVX-512 BF16, tries at import to fetch a gemm kernel from the hub
# (through `kernels`, which transformers installs) and logs warnings when it cannot, e.g. offline;
# its own CPU gemm is used instead. Every import of peft does this, in every process (the demo's
# spawned workers too), so those two loggers show errors only.
for _name in ("bitsandbytes.backends.cpu.ops", "kernels._internals.hf_hub"):
    _logging.getLogger(_name).setLevel(_logging.ERROR)
