"""A post-LayerNorm BERT layer with optional cross-attention (BLIP's text encoder and answer decoder).

    after_self  = LN(x + self_attn)                 self_attn = out(z),  z: every head's values
    after_cross = LN(after_self + cross_attn)       when the layer cross-attends a memory
    layer       = LN(after_cross + mlp)             mlp = output(intermediate(after_cross))

A memory is either per-cell states [N, M, E] (when the memory itself was patched) or keys and
values [1, H, M, d] cached once for every cell (when it was not).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from notice.models.blocks.attention import (AttentionInputs, absorbed_attention, attend, attend_shared, merge_heads,
                                            split_heads)

Memory = torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None


@dataclass
class CrossAttention:
    """A cross-attention sublayer's parts: queries from the rows, keys and values from a memory."""

    query: nn.Linear
    key: nn.Linear
    value: nn.Linear
    out: nn.Module
    norm: nn.Module


@dataclass
class BertBlock:
    query: nn.Linear
    key: nn.Linear
    value: nn.Linear
    self_out: nn.Module
    self_norm: nn.Module
    intermediate: nn.Module
    output: nn.Module
    output_norm: nn.Module
    heads: int
    causal: bool = False
    crossing: CrossAttention | None = None  # None: a layer without cross-attention

    def forward(self, x: torch.Tensor, memory: Memory = None) -> torch.Tensor:
        """The layer on rows [N, P, D]."""
        if x.shape[1] == 1:  # one position attends only itself: softmax is exactly 1, the output its value
            z = self.value(x)
        else:
            q, k, v = (split_heads(proj(x), self.heads) for proj in (self.query, self.key, self.value))
            mask = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool, device=x.device).tril() if self.causal else None
            z = merge_heads(attend(q, k, v, mask))
        return self.from_self(self.self_norm(self.self_out(z) + x), memory)

    def from_self(self, after_self: torch.Tensor, memory: Memory) -> torch.Tensor:
        after_cross = after_self if self.crossing is None else self.cross(after_self, memory)
        return self.mlp(after_cross)

    def mlp(self, after_cross: torch.Tensor) -> torch.Tensor:
        return self.output_norm(self.output(self.intermediate(after_cross)) + after_cross)

    def cross(self, x: torch.Tensor, memory: Memory) -> torch.Tensor:
        """The cross-attention sublayer on rows [N, K, D]: LN(x + cross_attn)."""
        cross = self._crossing()
        q = split_heads(cross.query(x), self.heads)  # [N, H, K, d]
        n, h, k, d = q.shape
        if isinstance(memory, torch.Tensor):
            m, width = memory.shape[1], h * d
            if k * (width + h * m) < m * width:  # few queries: cheaper not to project the memory
                z = absorbed_attention(q, memory, cross.key, cross.value)
            else:
                z = attend(q, split_heads(cross.key(memory), h), split_heads(cross.value(memory), h))
        else:
            assert memory is not None, "a cross-attention layer needs its memory"
            z = attend_shared(q, *memory)
        return cross.norm(cross.out(merge_heads(z)) + x)

    def _crossing(self) -> CrossAttention:
        if self.crossing is None:
            raise ValueError("this layer has no cross-attention")
        return self.crossing

    def cross_kv(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [1, H, M, d] of one memory's states [M, E], for every cell to share."""
        cross = self._crossing()
        return split_heads(cross.key(states[None]), self.heads), split_heads(cross.value(states[None]), self.heads)

    def self_inputs(self, x: torch.Tensor) -> AttentionInputs:
        """What the self-attention heads read for a layer input x [P, D]."""
        q, k, v = (split_heads(proj(x[None]), self.heads)[0] for proj in (self.query, self.key, self.value))
        mask = torch.ones(len(x), len(x), dtype=torch.bool, device=x.device).tril() if self.causal else None
        return AttentionInputs(q, k, v, mask, q.shape[-1] ** -0.5)

    def cross_inputs(self, after_self: torch.Tensor, states: torch.Tensor) -> AttentionInputs:
        """What the cross-attention heads read: queries of the rows [P, D], keys and values of memory [M, E]."""
        cross = self._crossing()
        q = split_heads(cross.query(after_self[None]), self.heads)[0]
        k, v = (split_heads(proj(states[None]), self.heads)[0] for proj in (cross.key, cross.value))
        return AttentionInputs(q, k, v, None, q.shape[-1] ** -0.5)

    def cross_weights(self, after_self: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """Softmax cross-attention [N, H, P, M] of rows [N, P, D] over memory states [N, M, E] (float32)."""
        cross = self._crossing()
        q = split_heads(cross.query(after_self), self.heads)
        k = split_heads(cross.key(states), self.heads)
        return ((q @ k.transpose(2, 3)).float() * q.shape[-1] ** -0.5).softmax(dim=-1)

    def finish(self, target: str, value: torch.Tensor, mine: Callable[[str], torch.Tensor],
               memory: Memory = None) -> torch.Tensor:
        """The layer's output at patched rows [N, K, W] from the target's value there; mine(name) gives the
        receiving run's intermediates at those rows; memory: the cached keys/values of the layer's memory."""
        if target == "layer":
            return value
        if target == "mlp":
            return self.output_norm(value + mine("after_cross"))
        if target.startswith("cross_attn"):
            cross = self._crossing()
            write = cross.out(value) if target == "cross_attn.z" else value
            return self.mlp(cross.norm(write + mine("after_self")))
        write = self.self_out(value) if target == "self_attn.z" else value
        return self.from_self(self.self_norm(write + mine("x")), memory)

    def derive(self, store: dict[str, torch.Tensor]) -> None:
        store["after_self"] = self.self_norm(store["self_attn"] + store["x"])
        store["after_cross"] = (store["after_self"] if self.crossing is None
                                else self.crossing.norm(store["cross_attn"] + store["after_self"]))
