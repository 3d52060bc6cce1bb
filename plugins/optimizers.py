"""Optimizer plugin ``optimizers``: ``adamw`` (the default).

An optimizer plugin builds a ``torch.optim.Optimizer`` over the model's parameters; the core then sets
every param group's learning rate from the schedule each step (its ``lr`` scaled by the schedule's
factor), clips gradients, and saves and restores the optimizer's ``state_dict``.
"""

from dataclasses import dataclass, field

import torch

from anexa_core import AnexaError, hookimpl


@dataclass
class AdamW:
    """AdamW (Loshchilov & Hutter 2019) at ``--lr``: weight decay on the matrices and embeddings, none on
    biases and norm gains (as in GPT-2 and nanoGPT)."""

    weight_decay: float = field(default=0.1, metadata={"help": "decoupled weight decay of 2-D parameters"})
    beta1: float = 0.9
    beta2: float = 0.99
    eps: float = 1e-8

    def __post_init__(self) -> None:
        if self.weight_decay < 0:
            raise AnexaError(f"adamw weight_decay must not be negative, got {self.weight_decay}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise AnexaError(f"adamw beta1 and beta2 must be in [0, 1), got {self.beta1} and {self.beta2}")
        if not self.eps > 0:
            raise AnexaError(f"adamw eps must be positive, got {self.eps}")

    def build(self, model, config) -> torch.optim.Optimizer:
        groups = model.parameter_groups()
        decayed = groups["embeddings"] + groups["head"] + groups["matrices"]
        fused = decayed[0].is_cuda
        return torch.optim.AdamW(
            [{"params": decayed, "weight_decay": self.weight_decay}, {"params": groups["vectors"], "weight_decay": 0.0}],
            lr=config.lr, betas=(self.beta1, self.beta2), eps=self.eps, fused=fused,
        )


@hookimpl
def register_optimizers(register):
    register("adamw", AdamW)
