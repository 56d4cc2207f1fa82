"""Synthetic results tables shaped like the patching store's, for analysis and report tests."""

from __future__ import annotations

import numpy as np
import pandas as pd


DEFAULT_CORRUPTION = {"image": "image_smp", "text": "text_str"}


def synthetic_table(planted: dict[str, list[tuple[int, int]]], samples: int = 12, layers: int = 3, heads: int = 4,
                    positions: int = 5, seed: int = 0) -> pd.DataFrame:
    """Head and module rows like the patching store writes; planted heads get large effects.

    `planted` keys are "task/modality" (SMP or STR) or "task/modality/corruption" (e.g.
    "color/image/image_noise")."""
    rng = np.random.default_rng(seed)
    rows = []
    for condition, strong in planted.items():
        task, modality, *named = condition.split("/")
        corruption = named[0] if named else DEFAULT_CORRUPTION[modality]
        for s in range(samples):
            pair_id = f"{task}-{corruption if named else modality}-{s}"
            for layer in range(layers):
                for position in range(positions):
                    for component in ("layer", "mlp", "cross_attn"):
                        rows.append(dict(pair_id=pair_id, task=task, modality=modality, corruption=corruption,
                                         direction="denoise", stream="text", layer=layer, component=component,
                                         head=pd.NA, position=position, token=f"t{position}",
                                         normalized_effect=(layer + 1) * 0.1 * (position == 2)
                                         + rng.normal(0, 0.01), flags=""))
                    for head in range(heads):
                        big = (layer, head) in strong and position == 2
                        rows.append(dict(pair_id=pair_id, task=task, modality=modality, corruption=corruption,
                                         direction="denoise", stream="text", layer=layer, component="cross_attn",
                                         head=head, position=position, token=f"t{position}",
                                         normalized_effect=(0.8 if big else 0.0) + rng.normal(0, 0.02),
                                         flags=""))
    return pd.DataFrame(rows).astype({"head": "Int64", "position": "Int64"})


def lm_table(planted: dict[str, list[tuple[int, int]]], cross_layers: tuple[int, ...] = (), samples: int = 12,
             layers: int = 4, heads: int = 4, seed: int = 0) -> pd.DataFrame:
    """A language model's table (stream `lm`): self-attention heads and modules on every layer, as an
    image-token LM's; with `cross_layers`, cross-attention on those layers instead, as Llama-3.2-Vision's
    (whose cross-attention layers have no self-attention)."""
    table = synthetic_table(planted, samples, layers, heads, seed=seed).assign(stream="lm")
    self_attn = (table["component"] == "cross_attn") & ~table["layer"].isin(cross_layers)
    table.loc[self_attn, "component"] = "self_attn"
    return table
