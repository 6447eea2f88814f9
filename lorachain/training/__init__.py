"""Training: everything that turns a config into trained weights.

`loop` (the one training loop for LoRA, COLA, full fine-tuning and the selectors), `step` (the
optimizer step), `precision` (bf16/fp16 autocast, fp32 masters), `parallel` (processes under torchrun),
`runfolder` (the run folder, stop flag, memory readings), `evaluate` (loss and task scores) and
`plots` (training curves). The knot itself lives in `lorachain.chain`; training calls it.
"""

from lorachain.training.loop import Result, train

__all__ = ["Result", "train"]
