"""`dpo:` the preference objective's settings (used when `train.objective` is `dpo`)."""

from __future__ import annotations

from dataclasses import dataclass

from lorachain.config.base import check


@dataclass
class DPOConfig:
    """Direct preference optimisation (sigmoid loss, as TRL's DPOTrainer `loss_type: sigmoid`).

    The loss of a pair is -log σ(β·((log π(y_c|x) − log π_ref(y_c|x)) − (log π(y_r|x) − log π_ref(y_r|x)))),
    log-probabilities summed over the response's tokens and the loss averaged over the pairs of
    a step. The reference π_ref is the model the run starts from, whatever knots are tied.
    """

    beta: float = 0.1  # strength of the pull towards the reference (TRL's default)
    # conservative DPO (cDPO): the share ε of pairs taken to be mislabelled,
    # loss -(1-ε)·log σ(βΔ) - ε·log σ(-βΔ); 0: the plain sigmoid loss
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        check(self.beta > 0, f"dpo.beta: expected > 0, got {self.beta}")
        check(
            0.0 <= self.label_smoothing < 0.5,
            f"dpo.label_smoothing: expected 0 <= value < 0.5, got {self.label_smoothing}",
        )
