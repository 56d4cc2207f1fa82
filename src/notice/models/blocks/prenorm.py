"""Pre-norm residual layers: x + attn(norm(x)), then + mlp(norm(·)).

Components of such a layer: "self_attn" (the attention's write into the residual stream),
"self_attn.z" (every head's values before the output projection), "mlp" (the MLP's write) and
"layer" (the output). Writes may pass an extra norm before the residual add (Gemma's sandwich
norms); the family's site map then points the write at that norm's output. Writes may be scaled by
tanh of a learned gate (Llama-3.2-Vision); a site then holds the write before its gate, a constant
of the model, so patching it patches the gated write.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from notice.models.blocks.attention import AttentionInputs, attend, merge_heads, rotate, split_heads

Rope = tuple[torch.Tensor, torch.Tensor] | None  # cos, sin [1 or N, Q, d]; None: positions are learned
# embeddings added before the first layer (OPT), nothing rotates


@dataclass(kw_only=True)
class PreNormBlock:
    out: nn.Module  # output projection: per-head values → the attention's write
    mlp_norm: nn.Module
    mlp: nn.Module
    attn_out_norm: nn.Module | None = None
    mlp_out_norm: nn.Module | None = None
    attn_gate: nn.Parameter | None = None  # the attention's write is scaled by tanh(attn_gate)
    mlp_gate: nn.Parameter | None = None

    def attn_write(self, z: torch.Tensor) -> torch.Tensor:
        write = self.out(z)
        return write if self.attn_out_norm is None else self.attn_out_norm(write)

    def after_attention(self, x: torch.Tensor, write: torch.Tensor) -> torch.Tensor:
        """The layer's output from its input and its attention's (ungated) write, position-wise."""
        resid = x + gated(self.attn_gate, write)
        return resid + gated(self.mlp_gate, self.mlp_write(resid))

    def mlp_write(self, resid: torch.Tensor) -> torch.Tensor:
        write = self.mlp(self.mlp_norm(resid))
        return write if self.mlp_out_norm is None else self.mlp_out_norm(write)

    def finish(self, target: str, value: torch.Tensor, mine: Callable[[str], torch.Tensor]) -> torch.Tensor:
        """The layer's output at patched rows [N, K, W] from the patched target's value there; mine(name)
        gives the receiving run's intermediates at those rows."""
        if target == "layer":
            return value
        if target == "mlp":
            return mine("after_self") + gated(self.mlp_gate, value)
        write = self.attn_write(value) if target == "self_attn.z" else value
        return self.after_attention(mine("x"), write)

    def derive(self, store: dict[str, torch.Tensor]) -> None:
        store["after_self"] = store["x"] + gated(self.attn_gate, store["self_attn"])


def gated(gate: nn.Parameter | None, write: torch.Tensor) -> torch.Tensor:
    """A write scaled by tanh of its gate, as Llama-3.2-Vision's gated layers add it; ungated as it is."""
    return write if gate is None else gate.tanh() * write


@dataclass(kw_only=True)
class EncoderBlock(PreNormBlock):
    """A bidirectional pre-norm encoder layer (ViT, CLIP, SigLIP; Qwen2-VL's tower with 2-D rotary
    positions, and Qwen2.5-VL's with attention inside windows on some layers)."""

    attn_norm: nn.Module
    qkv: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # flat [N, P, H*d] each
    heads: int
    scale: float | None = None

    def forward(self, x: torch.Tensor, rope: Rope | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The layer on rows [N, P, D]; rope: cos, sin [1, P, d] of the positions (applied in float32, as
        vision towers do); mask [P, P] bool (True = attend), e.g. attention windows."""
        q, k, v = self.heads_read(x, rope)
        return self.after_attention(x, self.attn_write(merge_heads(attend(q, k, v, mask, scale=self.scale))))

    def heads_read(self, x: torch.Tensor, rope: Rope | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values [N, H, P, d] of rows [N, P, D], queries and keys rotated by `rope`."""
        q, k, v = (split_heads(t, self.heads) for t in self.qkv(self.attn_norm(x)))
        if rope is not None:
            q, k = (rotate(t.float(), rope).to(t.dtype) for t in (q, k))
        return q, k, v

    def attention_inputs(self, x: torch.Tensor, rope: Rope | None = None,
                         mask: torch.Tensor | None = None) -> AttentionInputs:
        """What the heads read for a layer input x [P, D] (rope and mask as in `forward`)."""
        q, k, v = (t[0] for t in self.heads_read(x[None], rope))
        return AttentionInputs(q, k, v, mask, self.scale or q.shape[-1] ** -0.5)


@dataclass(kw_only=True)
class DecoderBlock(PreNormBlock):
    """A pre-norm decoder layer with rotary positions and grouped-query attention, rerun on positions
    start.. over the receiving run's cached, already rotated keys and values of positions ..start."""

    attn_norm: nn.Module
    q_proj: nn.Module
    k_proj: nn.Module
    v_proj: nn.Module
    heads: int
    kv_heads: int
    head_dim: int
    scale: float | None = None
    q_norm: nn.Module | None = None  # per-head norms before the rotation (Gemma 3, Qwen3)
    k_norm: nn.Module | None = None

    def _heads(self, proj: nn.Module, norm: nn.Module | None, normed: torch.Tensor) -> torch.Tensor:
        n, q, _ = normed.shape
        x = proj(normed).view(n, q, -1, self.head_dim)
        return (x if norm is None else norm(x)).transpose(1, 2)  # [N, heads, Q, d]

    def queries(self, normed: torch.Tensor, rope: Rope) -> torch.Tensor:
        return rotated(self._heads(self.q_proj, self.q_norm, normed), rope)

    def keys_values(self, normed: torch.Tensor, rope: Rope) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotated keys and values [N, KVH, Q, d] of the normed input [N, Q, D]."""
        return rotated(self._heads(self.k_proj, self.k_norm, normed), rope), self._heads(self.v_proj, None, normed)

    def forward(self, hidden: torch.Tensor, rope: Rope, prefix: tuple[torch.Tensor, torch.Tensor] | None,
                mask: torch.Tensor | None) -> torch.Tensor:
        """The layer on rows [N, Q, D] at positions start..start+Q-1; prefix: keys and values of positions
        0..start-1 [1, KVH, start, d]; mask [Q, start+Q] bool or None (every key visible)."""
        n = hidden.shape[0]
        normed = self.attn_norm(hidden)
        keys, values = self.keys_values(normed, rope)
        if prefix is not None and prefix[0].shape[2]:
            keys = torch.cat([prefix[0].expand(n, -1, -1, -1), keys], dim=2)
            values = torch.cat([prefix[1].expand(n, -1, -1, -1), values], dim=2)
        z = attend(self.queries(normed, rope), keys, values, mask, self.scale)
        return self.after_attention(hidden, self.attn_write(merge_heads(z)))

    def attention_inputs(self, x: torch.Tensor, rope: Rope, mask: torch.Tensor | None) -> AttentionInputs:
        """What the query heads read for a layer input x [T, D] (keys and values repeated per query head)."""
        normed = self.attn_norm(x[None])
        keys, values = (t[0].repeat_interleave(self.heads // self.kv_heads, dim=0) for t in self.keys_values(normed, rope))
        return AttentionInputs(self.queries(normed, rope)[0], keys, values, mask,
                               self.head_dim ** -0.5 if self.scale is None else self.scale)

    def attention_weights(self, hidden: torch.Tensor, rope: Rope, mask: torch.Tensor | None) -> torch.Tensor:
        """Softmax attention [N, H, T, T] of the layer over its whole input [N, T, D] (eager, float32)."""
        normed = self.attn_norm(hidden)
        query, (keys, _) = self.queries(normed, rope), self.keys_values(normed, rope)
        keys = keys.repeat_interleave(self.heads // self.kv_heads, dim=1)
        scale = self.head_dim ** -0.5 if self.scale is None else self.scale
        scores = (query @ keys.transpose(2, 3)).float() * scale
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        return scores.softmax(dim=-1)


def rotated(x: torch.Tensor, rope: Rope) -> torch.Tensor:
    return x if rope is None else rotate(x, rope)


def causal_mask(start: int, count: int, device: torch.device, window: int | None = None) -> torch.Tensor | None:
    """Which keys 0..start+count-1 each query start..start+count-1 sees: causal, within `window`
    positions where the layer slides; None when every key is visible (one query, no window)."""
    if count == 1 and (window is None or start + 1 <= window):
        return None
    query = torch.arange(start, start + count, device=device)[:, None]
    key = torch.arange(start + count, device=device)[None]
    mask = key <= query
    if window is not None:
        mask &= key > query - window
    return mask
