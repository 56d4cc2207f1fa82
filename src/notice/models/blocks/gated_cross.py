"""A pre-norm layer whose only attention reads a memory (Llama-3.2-Vision's cross-attention layers).

    after_self = x + tanh(g_attn) · cross_attn        cross_attn = out(z), z: every query head's values
    layer      = after_self + tanh(g_mlp) · keep · mlp  mlp = mlp(norm(after_self)); keep: 0 on rows that
                                                        see no image (before the image token), else 1

No position reads another: a layer's rows depend on themselves and on the memory alone. The memory
(the image states) enters as keys and values, grouped-query and key-normed, either [1, KVH, M, d]
cached once for every cell (the image was not patched) or [N, KVH, M, d] per cell (it was). Which
memory tokens a row sees is an additive mask [Q, M] (0 or very negative), the model's own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from notice.models.blocks.attention import AttentionInputs, attend, merge_heads
from notice.models.blocks.prenorm import PreNormBlock, gated

KeysValues = tuple[torch.Tensor, torch.Tensor]  # [1 or N, KVH, M, d] each


@dataclass(kw_only=True)
class GatedCrossBlock(PreNormBlock):
    attn_norm: nn.Module
    q_proj: nn.Module
    k_proj: nn.Module
    v_proj: nn.Module
    q_norm: nn.Module
    k_norm: nn.Module
    heads: int
    kv_heads: int
    head_dim: int
    scale: float

    def queries(self, hidden: torch.Tensor) -> torch.Tensor:
        """Normed query heads [N, H, Q, d] of rows [N, Q, D]."""
        n, q, _ = hidden.shape
        return self.q_norm(self.q_proj(self.attn_norm(hidden)).view(n, q, self.heads, self.head_dim)).transpose(1, 2)

    def memory(self, states: torch.Tensor) -> KeysValues:
        """Keys and values [N, KVH, M, d] of memory states [N, M, E]."""
        n, m, _ = states.shape
        keys = self.k_norm(self.k_proj(states).view(n, m, self.kv_heads, self.head_dim)).transpose(1, 2)
        return keys, self.v_proj(states).view(n, m, self.kv_heads, self.head_dim).transpose(1, 2)

    def attend(self, q: torch.Tensor, memory: KeysValues, mask: torch.Tensor) -> torch.Tensor:
        """Every head's values [N, Q, H*d] of queries [N, H, Q, d] over the memory; mask [Q, M] additive."""
        keys, values = memory
        n, h, rows, d = q.shape
        if keys.shape[0] == 1 < n:  # one memory for every cell: the cells' rows become one long query
            z = attend(q.transpose(0, 1).reshape(1, h, n * rows, d), keys, values, mask.repeat(n, 1), self.scale)
            return merge_heads(z.reshape(h, n, rows, d).transpose(0, 1))
        return merge_heads(attend(q, keys, values, mask, self.scale))

    def forward(self, hidden: torch.Tensor, memory: KeysValues, mask: torch.Tensor,
                keep: torch.Tensor) -> torch.Tensor:
        """The layer on rows [N, Q, D]; mask [Q, M] (which memory tokens each row sees), keep [Q, 1]."""
        after_self = hidden + gated(self.attn_gate, self.out(self.attend(self.queries(hidden), memory, mask)))
        return after_self + keep * gated(self.mlp_gate, self.mlp_write(after_self))

    def attention_weights(self, hidden: torch.Tensor, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Softmax attention [N, H, Q, M] of rows [N, Q, D] over memory states [N, M, E] (eager, float32)."""
        keys, _ = self.memory(states)
        keys = keys.repeat_interleave(self.heads // self.kv_heads, dim=1)
        scores = (self.queries(hidden) @ keys.transpose(2, 3)).float() * self.scale
        return (scores + mask.float()).softmax(dim=-1)

    def cross_inputs(self, hidden: torch.Tensor, states: torch.Tensor, mask: torch.Tensor) -> AttentionInputs:
        """What the query heads read for a layer input [T, D] over memory states [M, E] (keys and values
        repeated per query head); mask [T, M] additive, the model's."""
        keys, values = (t[0].repeat_interleave(self.heads // self.kv_heads, dim=0) for t in self.memory(states[None]))
        return AttentionInputs(self.queries(hidden[None])[0], keys, values, mask == 0, self.scale)

    def finish(self, target: str, value: torch.Tensor, mine: Callable[[str], torch.Tensor]) -> torch.Tensor:
        """The layer's output at patched rows [N, K, W] from the target's value there; mine(name) gives the
        receiving run's intermediates at those rows ("keep" among them)."""
        if target == "layer":
            return value
        if target == "mlp":
            return mine("after_self") + mine("keep") * gated(self.mlp_gate, value)
        write = self.out(value) if target == "cross_attn.z" else value
        after_self = mine("x") + gated(self.attn_gate, write)
        return after_self + mine("keep") * gated(self.mlp_gate, self.mlp_write(after_self))

    def derive(self, store: dict[str, torch.Tensor]) -> None:
        store["after_self"] = store["x"] + gated(self.attn_gate, store["cross_attn"])
