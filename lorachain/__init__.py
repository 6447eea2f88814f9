"""lorachain: fine-tune and serve language models with chains of LoRA adapters."""

import logging as _logging
import os as _os

__version__ = "0.1.0"

# bitsandbytes, on a CPU with AVX-512 BF16, tries at import to fetch a gemm kernel from the hub
# (through `kernels`, which transformers installs) and logs warnings when it cannot, e.g. offline;
# its own CPU gemm is used instead. Every import of peft does this, in every process (the demo's
# spawned workers too), so those two loggers show errors only. torchao (optional), which peft imports
# whenever it is installed, warns that its CUDA-only libraries do not load on a CPU build, and through
# torch's pytree logger that it registers enums the old way: errors only there too.
_QUIET = ("bitsandbytes.backends.cpu.ops", "kernels._internals.hf_hub", "torchao", "torch.utils._pytree")
for _name in _QUIET:
    _logging.getLogger(_name).setLevel(_logging.ERROR)

# Large CPU tensors on transparent huge pages: PyTorch's allocator reads THP_MEM_ALLOC_ENABLE once, at
# its first allocation, so this takes effect where lorachain is imported before torch allocates (the
# CLI, torchrun's workers, `python -m lorachain`). A fresh 46 MB tensor written once took 34 ms on
# 4 KiB pages and 8 ms on 2 MiB pages here, and FSDP2 allocates every gathered weight afresh (its
# copy-out halved: docs/guides/scale.md). Set THP_MEM_ALLOC_ENABLE=0 to keep 4 KiB pages.
_os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
