"""Optimizer plugin ``optimizers``: ``adamw`` (the default) and ``muon``.

An optimizer plugin builds a ``torch.optim.Optimizer`` (or a list of them, one per parameter family)
over the model's parameters; the core then sets every param group's learning rate from the schedule each
step (its ``lr`` scaled by the schedule's factor), clips gradients, and saves and restores the state.
"""

from dataclasses import dataclass, field
from typing import Literal

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
        return self.over(groups["embeddings"] + groups["head"] + groups["matrices"], groups["vectors"], config.lr)

    def over(self, decayed, undecayed, lr) -> torch.optim.Optimizer:
        """AdamW over two families: ``decayed`` with weight decay, ``undecayed`` without."""
        param_groups = [
            {"params": decayed, "weight_decay": self.weight_decay},
            {"params": undecayed, "weight_decay": 0.0},
        ]
        # The fused kernel (CPU and CUDA) updates every tensor in one pass: measured 4× faster steps of the
        # optimizer alone on the seed model on this project's CPU than foreach=False.
        fused = all(p.device.type in ("cpu", "cuda") for p in decayed + undecayed)
        return torch.optim.AdamW(
            [g for g in param_groups if g["params"]], lr=lr, betas=(self.beta1, self.beta2), eps=self.eps, fused=fused
        )


@dataclass
class Muon:
    """Muon (Jordan et al. 2024; ``torch.optim.Muon``) for the hidden weight matrices — momentum
    orthogonalised by Newton–Schulz iterations — and AdamW for embeddings, head, biases and norm gains, as
    the modded-nanogpt speedrun does. With ``adjust_lr=match_rms_adamw`` (Liu et al. 2025, "Muon is
    Scalable for LLM Training") Muon's update has AdamW's RMS, so both run at ``--lr`` × their scale."""

    matrix_lr_scale: float = field(default=1.0, metadata={"help": "Muon's LR = --lr × this"})
    momentum: float = 0.95
    adjust_lr: Literal["match_rms_adamw", "original"] = "match_rms_adamw"
    weight_decay: float = field(default=0.1, metadata={"help": "decoupled weight decay of the matrices"})
    beta1: float = 0.9
    beta2: float = 0.99

    def __post_init__(self) -> None:
        if not self.matrix_lr_scale > 0:
            raise AnexaError(f"muon matrix_lr_scale must be positive, got {self.matrix_lr_scale}")
        if not 0 <= self.momentum < 1:
            raise AnexaError(f"muon momentum must be in [0, 1), got {self.momentum}")
        self._adamw = AdamW(weight_decay=self.weight_decay, beta1=self.beta1, beta2=self.beta2)

    def build(self, model, config) -> list[torch.optim.Optimizer]:
        groups = model.parameter_groups()
        matrices = [p for p in groups["matrices"] if p.dim() == 2]
        others = [p for p in groups["matrices"] if p.dim() != 2]
        muon = torch.optim.Muon(
            matrices,
            lr=config.lr * self.matrix_lr_scale,
            weight_decay=self.weight_decay,
            momentum=self.momentum,
            adjust_lr_fn=self.adjust_lr,
        )
        adamw = self._adamw.over(groups["embeddings"] + groups["head"] + others, groups["vectors"], config.lr)
        return [muon, adamw]


@hookimpl
def register_optimizers(register):
    register("adamw", AdamW)
    register("muon", Muon)
