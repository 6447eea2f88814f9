"""Task routing (the second "Chain of LoRA"): data, task selection, training, evaluation."""
