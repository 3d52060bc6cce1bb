"""The optimizer plugin built over a model, as one optimizer the loop, the schedule and checkpoints can use."""

from __future__ import annotations

from typing import Any

import torch

from anexa_core import plugins
from anexa_core.config import TrainConfig
from anexa_core.model.gpt import GPT


class Optimizers:
    """Several optimizers stepped as one — Muon for the matrices, AdamW for the rest — offering what the
    loop, the LR schedule and checkpoints use of an optimizer."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.optimizers = list(optimizers)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [group for optimizer in self.optimizers for group in optimizer.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for optimizer in self.optimizers:
            optimizer.step()

    def state_dict(self) -> dict[str, Any]:
        return {"optimizers": [optimizer.state_dict() for optimizer in self.optimizers]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        states = state.get("optimizers") if isinstance(state, dict) else None
        if not isinstance(states, list) or len(states) != len(self.optimizers):
            raise ValueError(f"expected the state of {len(self.optimizers)} optimizers")
        for optimizer, one in zip(self.optimizers, states, strict=True):
            optimizer.load_state_dict(one)


def combine(built: torch.optim.Optimizer | list[torch.optim.Optimizer]) -> torch.optim.Optimizer | Optimizers:
    """What an optimizer plugin's ``build`` returned, as one optimizer."""
    if isinstance(built, (list, tuple)):
        return built[0] if len(built) == 1 else Optimizers(built)
    return built


def make_optimizer(model: GPT, config: TrainConfig) -> torch.optim.Optimizer | Optimizers:
    """The optimizer plugin ``config.optimizer`` built over ``model``; each group remembers its peak LR."""
    factory, _ = plugins.create("optimizers", config.optimizer, config.optimizer_options)
    optimizer = combine(factory.build(model, config))
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])  # the peak; the schedule scales it
    return optimizer
