"""Task routing (the second "Chain of LoRA"): instruction data, selector kinds, training a store and
choosing a task. Measuring a store is in `routing.eval`."""
