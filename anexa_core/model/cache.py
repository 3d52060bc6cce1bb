"""The KV cache: keys and values of the positions decoded so far, so each new token costs one position."""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of the positions seen so far: one preallocated buffer pair per attention layer.

    The whole protocol is :meth:`update`: an attention layer passes its new keys and values and gets
    back everything it has stored, to attend over. Each layer's length advances inside its own
    ``update``; nothing else moves. ``len(cache)`` is the number of positions stored, read by the model
    *between* forward passes to number the next tokens (a blocks plugin gets them as ``positions``).
    """

    def __init__(self, max_len: int):
        """``max_len``: the most positions it will hold (the model's ``block_size``)."""
        self.max_len = max_len
        self._keys: list[torch.Tensor] = []
        self._values: list[torch.Tensor] = []
        self._lengths: list[int] = []

    def __len__(self) -> int:
        return self._lengths[0] if self._lengths else 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``k, v`` (B, H, T, D) to layer ``layer``; return its keys and values so far (B, H, T', D).

        Layers are numbered 0, 1, … in the order they first call. Raises ``ValueError`` beyond ``max_len``.
        """
        if layer == len(self._keys):
            shape = (k.size(0), k.size(1), self.max_len, k.size(3))
            self._keys.append(k.new_empty(shape))
            self._values.append(v.new_empty(shape))
            self._lengths.append(0)
        elif layer > len(self._keys):
            raise ValueError(f"KV cache layers must be used in order 0, 1, …: got layer {layer} first")
        start = self._lengths[layer]
        end = start + k.size(2)
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; {end} requested")
        self._keys[layer][:, :, start:end] = k
        self._values[layer][:, :, start:end] = v
        self._lengths[layer] = end
        return self._keys[layer][:, :, :end], self._values[layer][:, :, :end]
