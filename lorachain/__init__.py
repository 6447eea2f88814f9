"""lorachain: fine-tune and serve language models with chains of LoRA adapters."""

__version__ = "0.1.0"
