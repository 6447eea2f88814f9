"""Gradient (activation) checkpointing of the decoder layers, the non-reentrant kind.

The reentrant `torch.utils.checkpoint` drops the gradients of parameters inside a checkpointed block
when its inputs do not require grad — exactly the LoRA case, where every base weight is frozen
(transformers#26221, trl#3089). The non-reentrant kind keeps them, so it is the only one used here.
The flags live on the base model's layers, so they survive PEFT wrapping, knots and `unload`;
`enable_checkpointing` is idempotent and the loop calls it at every new link.
"""

from __future__ import annotations

from torch import nn

from lorachain.config import ConfigError

KWARGS = {"use_reentrant": False}


def check_checkpointing(model: nn.Module) -> None:
    """Raise one ConfigError line unless `model` supports gradient checkpointing."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(
            f"train.gradient_checkpointing: {type(model).__name__} does not support gradient "
            "checkpointing; set it to false"
        )


def enable_checkpointing(model: nn.Module) -> None:
    """Checkpoint every decoder layer of `model` (non-reentrant); the embeddings' output requires
    grad so that frozen layers pass gradients through to the LoRA factors. Idempotent."""
    check_checkpointing(model)
    newer = hasattr(type(model), "is_activation_checkpointing")  # transformers >= 5 renamed it
    if getattr(model, "is_activation_checkpointing" if newer else "is_gradient_checkpointing", False):
        return
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=dict(KWARGS))
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=dict(KWARGS))
    if hasattr(model, "enable_input_require_grads") and not hasattr(model, "_require_grads_hook"):
        model.enable_input_require_grads()
