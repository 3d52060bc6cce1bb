"""The KV cache: keys and values of the positions decoded so far, so each new token costs one position.

One buffer pair per attention layer, ``(rows, kv_heads, capacity, head_dim)``: the capacity starts at
what the first tokens need and doubles when a row outgrows it, up to ``max_len`` (a 8,192-token context
costs memory only when it is used). Rows are sequences. Usually they advance together; in the batched engine they are *ragged*: each row holds its
own number of positions, so requests of different lengths decode in one forward pass.
"""

from __future__ import annotations

import torch

MIN_CAPACITY = 64
"""Positions a new cache's buffers hold at first (at most ``max_len``)."""


def grown_capacity(start: int, length: int, max_len: int) -> int:
    """The positions per row of buffers that begin holding ``start`` — at least :data:`MIN_CAPACITY` — and
    double until they hold ``length``, never more than ``max_len``: how :class:`KVCache` allocates, which the
    batched engine's KV-cache budget counts on."""
    capacity = min(max_len, max(MIN_CAPACITY, start))
    while capacity < length:
        capacity = min(max_len, 2 * capacity)
    return capacity


class KVCache:
    """Keys and values of the positions seen so far: one buffer pair per attention layer.

    The protocol for an attention layer ``i`` is :meth:`update`, then :meth:`lengths`: it passes its new
    keys and values and gets back everything it has stored to attend over, and ``lengths(i)`` says how
    many of those positions are valid in each row (``None`` when every row has them all, the usual
    case). Each layer's lengths advance inside its own ``update``; nothing else moves. The model reads
    :meth:`positions` *between* forward passes to number the next tokens (a blocks plugin gets them as
    ``positions``).
    """

    def __init__(self, max_len: int):
        """``max_len``: the most positions a row holds (the model's ``block_size``). Rows start empty and
        advance together; :meth:`batch_like` makes a ragged cache."""
        self.max_len = max_len
        self._keys: list[torch.Tensor] = []
        self._values: list[torch.Tensor] = []
        self._lengths: list[int] = []  # per layer, while rows advance together
        self._row_lengths: list[torch.Tensor] | None = None  # per layer (B,) int64, for ragged rows
        self._view = False  # a narrowed view shares its parent's buffers and must not replace them

    @classmethod
    def batch_like(cls, source: KVCache, rows: int) -> KVCache:
        """An empty ragged cache of ``rows`` rows with ``source``'s layers, heads, dtype and device."""
        cache = cls(source.max_len)
        for keys in source._keys:
            shape = (rows, *keys.shape[1:])
            cache._keys.append(keys.new_zeros(shape))
            cache._values.append(keys.new_zeros(shape))
        device = source._keys[0].device if source._keys else None
        cache._row_lengths = [torch.zeros(rows, dtype=torch.long, device=device) for _ in source._keys]
        return cache

    @property
    def ragged(self) -> bool:
        """Whether rows may hold different numbers of positions."""
        return self._row_lengths is not None

    def __len__(self) -> int:
        """Positions held: every row's, or the longest row's when they differ."""
        if self._row_lengths is not None:
            lengths = self._row_lengths[0]
            return int(lengths.max()) if len(lengths) else 0
        return self._lengths[0] if self._lengths else 0

    def positions(self, length: int, device: torch.device) -> torch.Tensor:
        """The absolute positions of the next ``length`` tokens: (T,) int64, or (B, T) for ragged rows."""
        steps = torch.arange(length, device=device)
        if self._row_lengths is None:
            return steps + len(self)
        return self._row_lengths[0].to(device)[:, None] + steps

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``k, v`` (B, H, T, D) to layer ``layer``; return its keys and values so far (B, H, T', D).

        For ragged rows each row's ``T`` new positions land after its own last one, and ``T'`` is the
        longest row's length (the others are padded: see :meth:`lengths`). Layers are numbered 0, 1, … in
        the order they first call. Raises ``ValueError`` beyond ``max_len``.
        """
        if layer == len(self._keys) and self._row_lengths is None:
            shape = (k.size(0), k.size(1), grown_capacity(k.size(2), 0, self.max_len), k.size(3))
            # Zeros, not empty memory: a padded slot is masked out, and 0 × a finite value stays 0.
            self._keys.append(k.new_zeros(shape))
            self._values.append(v.new_zeros(shape))
            self._lengths.append(0)
        elif layer >= len(self._keys):
            raise ValueError(f"KV cache layers must be used in order 0, 1, …: got layer {layer} first")
        if self._row_lengths is None:
            start = self._lengths[layer]
            end = start + k.size(2)
            if end > self.max_len:
                raise ValueError(f"KV cache holds {self.max_len} positions; {end} requested")
            self._grow(layer, end)
            self._keys[layer][:, :, start:end] = k
            self._values[layer][:, :, start:end] = v
            self._lengths[layer] = end
            return self._keys[layer][:, :, :end], self._values[layer][:, :, :end]
        lengths = self._row_lengths[layer]
        longest = int(lengths.max()) + k.size(2)
        if longest > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; {longest} requested")
        self._grow(layer, longest)
        slots = lengths[:, None] + torch.arange(k.size(2), device=k.device)  # (B, T): each row's next positions
        slots = slots[:, None, :, None].expand(-1, k.size(1), -1, k.size(3))  # (B, H, T, D), as k
        self._keys[layer].scatter_(2, slots, k)
        self._values[layer].scatter_(2, slots, v)
        lengths.add_(k.size(2))  # in place: a narrowed view advances its parent's rows too
        return self._keys[layer][:, :, :longest], self._values[layer][:, :, :longest]

    @property
    def capacity(self) -> int:
        """Positions every row can hold now without the buffers growing."""
        return self._keys[0].size(2) if self._keys else 0

    def reserve(self, length: int) -> None:
        """Make room for ``length`` positions per row in every layer now (a narrowed view cannot grow its
        parent's buffers: reserve on the parent first)."""
        for layer in range(len(self._keys)):
            self._grow(layer, length)

    def _grow(self, layer: int, length: int) -> None:
        """Double layer ``layer``'s buffers until they hold ``length`` positions (at most ``max_len``)."""
        keys = self._keys[layer]
        length = min(length, self.max_len)
        if length <= keys.size(2):
            return
        if self._view:
            raise ValueError("a narrowed KV cache cannot grow: reserve() on the cache it was narrowed from")
        capacity = grown_capacity(keys.size(2), length, self.max_len)
        for buffers in (self._keys, self._values):
            grown = buffers[layer].new_zeros((*buffers[layer].shape[:2], capacity, buffers[layer].size(3)))
            grown[:, :, : buffers[layer].size(2)] = buffers[layer]
            buffers[layer] = grown

    def lengths(self, layer: int) -> torch.Tensor | None:
        """Valid positions per row (B,) int64 of what layer ``layer``'s last :meth:`update` returned, or
        ``None`` when every row has them all. Pass it to the attention as ``lengths``."""
        return None if self._row_lengths is None else self._row_lengths[layer]

    # --- rows of the batched engine -----------------------------------------------------------------

    def row_length(self, row: int) -> int:
        """Positions held by row ``row``."""
        return len(self) if self._row_lengths is None else int(self._row_lengths[0][row])

    def row_lengths(self) -> list[int]:
        """Positions held by each row (one device sync for all of them)."""
        if self._row_lengths is None:
            return [len(self)] * self.rows
        return self._row_lengths[0].tolist()

    def copy_row(self, row: int, source: KVCache, source_row: int = 0) -> None:
        """Ragged row ``row`` becomes a copy of ``source``'s row ``source_row``, its length too: how a
        request prefilled on its own joins the batch."""
        assert self._row_lengths is not None, "copy_row needs a ragged cache (KVCache.batch_like)"
        length = source.row_length(source_row)
        self.reserve(length)
        for layer in range(len(self._keys)):
            self._keys[layer][row, :, :length] = source._keys[layer][source_row, :, :length]
            self._values[layer][row, :, :length] = source._values[layer][source_row, :, :length]
            self._row_lengths[layer][row] = length

    @property
    def rows(self) -> int:
        """Rows the buffers hold (the batch's slots, used or free)."""
        return self._keys[0].size(0) if self._keys else 0

    def resize_rows(self, rows: int) -> None:
        """A ragged cache holds ``rows`` rows from now on: new rows empty, rows from ``rows`` on dropped (they
        must be free). How the batched engine allocates only the rows it runs."""
        assert self._row_lengths is not None and not self._view, "resize_rows needs a ragged cache of its own"
        kept = min(rows, self.rows)
        for buffers in (self._keys, self._values):
            for layer, old in enumerate(buffers):
                resized = old.new_zeros((rows, *old.shape[1:]))
                resized[:kept] = old[:kept]
                buffers[layer] = resized
        self._row_lengths = [
            torch.cat([lengths[:kept], lengths.new_zeros(rows - kept)]) for lengths in self._row_lengths
        ]

    def free_row(self, row: int) -> None:
        """Row ``row`` holds nothing any more (its memory is reused by the next request)."""
        assert self._row_lengths is not None, "free_row needs a ragged cache (KVCache.batch_like)"
        for lengths in self._row_lengths:
            lengths[row] = 0

    def narrow(self, rows: int) -> KVCache:
        """A ragged cache over the first ``rows`` rows sharing this one's memory: what it stores and how far
        its rows advance is this cache's too."""
        assert self._row_lengths is not None, "narrow needs a ragged cache (KVCache.batch_like)"
        view = KVCache(self.max_len)
        view._view = True
        view._keys = [keys[:rows] for keys in self._keys]
        view._values = [values[:rows] for values in self._values]
        view._row_lengths = [lengths[:rows] for lengths in self._row_lengths]
        return view
