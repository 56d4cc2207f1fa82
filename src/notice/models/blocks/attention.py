"""Attention pieces every block shares: head splits, rotary embeddings, attention over memories."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[N, P, H*d] → [N, H, P, d]"""
    n, p, width = x.shape
    return x.view(n, p, heads, width // heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[N, H, P, d] → [N, P, H*d]"""
    n, h, p, d = x.shape
    return x.transpose(1, 2).reshape(n, p, h * d)


def rotate(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotary embedding as Llama applies it (rotate-half): x [N, H, Q, d] with cos, sin [1 or N, Q, d]."""
    cos, sin = (t[:, None] for t in rope)
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
           scale: float | None = None) -> torch.Tensor:
    """softmax(q kᵀ · scale + mask) v, with fewer key/value heads than query heads shared by groups:
    q [N, H, Q, d], k and v [N, KVH, M, d], mask [Q, M] bool (True = attend) → [N, H, Q, d]."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=k.shape[1] != q.shape[1])


def attend_shared(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Attention of N cells' queries [N, H, K, d] to one memory's keys/values [1, H, M, d] in one call."""
    n, h, rows, d = q.shape
    if k.shape[0] != 1 or n == 1:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    z = F.scaled_dot_product_attention(q.transpose(0, 1).reshape(1, h, n * rows, d), k, v, scale=scale)
    return z.reshape(h, n, rows, d).transpose(0, 1)


def absorbed_attention(q: torch.Tensor, memory: torch.Tensor, key: torch.nn.Linear,
                       value: torch.nn.Linear) -> torch.Tensor:
    """softmax(q·(memory Wk + bk)ᵀ/√d)·(memory Wv + bv) without projecting the memory: the key
    projection moves onto the queries and the value projection after the weighted sum (attention
    weights sum to 1; the key bias adds one constant per query and head, which softmax ignores).
    q [N, H, K, d], memory [N, M, E] → [N, H, K, d]. Cheaper when K·d ≪ M·E (an answer decoder)."""
    n, h, k, d = q.shape
    w_key = key.weight.view(h, d, -1)  # [H, d, E]
    w_value = value.weight.view(h, d, -1)
    q_mem = torch.einsum("nhkd,hde->nhke", q, w_key)  # [N, H, K, E]
    scores = torch.einsum("nhke,nme->nhkm", q_mem, memory) * d ** -0.5
    mixed = torch.einsum("nhkm,nme->nhke", scores.softmax(dim=-1), memory)  # [N, H, K, E]
    out = torch.einsum("nhke,hde->nhkd", mixed, w_value)
    return out if value.bias is None else out + value.bias.view(1, h, 1, d)


@dataclass
class AttentionInputs:
    """What one attention layer's query heads read: q [H, T, d], keys and values [H, S, d] (a grouped
    key/value head repeated for each of its query heads), which keys each query sees (mask [T, S] bool,
    None: all) and the score scale."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    mask: torch.Tensor | None
    scale: float

    def log_pattern(self) -> torch.Tensor:
        """log softmax of the scores [H, T, S], float64."""
        scores = (self.q.double() @ self.k.double().transpose(1, 2)) * self.scale
        if self.mask is not None:
            scores = scores.masked_fill(~self.mask, float("-inf"))
        return scores.log_softmax(dim=-1)


def first_order_change(receiving: AttentionInputs, source: AttentionInputs) -> torch.Tensor:
    """The change of every head's values z [H, T, d] when the head reads the source's queries, keys and values,
    to first order in those changes (what a gradient times the input differences gives): the scores move by
    Δq·kᵀ + q·Δkᵀ, the softmax is linearised, dA = A ⊙ (dS − Σ A dS), and Δz = dA·v + A·Δv. Under a saturated
    softmax dA is near zero however large the change: AtP's false negatives. Float64."""
    p = receiving.log_pattern().exp()  # [H, T, S]
    q, k, v = (t.double() for t in (receiving.q, receiving.k, receiving.v))
    d_scores = ((source.q.double() - q) @ k.transpose(1, 2) + q @ (source.k.double() - k).transpose(1, 2)) * receiving.scale
    d_scores = d_scores.masked_fill(p == 0, 0.0)
    d_pattern = p * (d_scores - (p * d_scores).sum(-1, keepdim=True))
    return d_pattern @ v + p @ (source.v.double() - v)


def exact_change(receiving: AttentionInputs, source: AttentionInputs) -> torch.Tensor:
    """The change of every head's values z [H, T, d] with both attention patterns computed exactly (AtP*'s QK
    fix: nothing is linearised before the head's values). Float64."""
    return source.log_pattern().exp() @ source.v.double() - receiving.log_pattern().exp() @ receiving.v.double()
