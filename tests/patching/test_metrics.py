"""Metrics on hand-made logits: LD, normalized effect, p(correct), KL, and the tiny-gap flag."""

from __future__ import annotations

import math

import numpy as np
import torch

from notice.patching.metrics import baseline, cell_stats, normalized_effect


def test_metrics_on_known_logits():
    clean, corrupt = torch.tensor([2.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])
    base = baseline(clean, corrupt, correct_id=0, incorrect_id=1)
    assert (base.ld_clean, base.ld_corrupt, base.flags) == (2.0, -1.0, ())
    stats = cell_stats(torch.stack([clean, corrupt, torch.tensor([0.5, 0.0, 0.0])]), base).numpy()
    np.testing.assert_allclose(stats[:, 0], [2.0, -1.0, 0.5])  # LD
    np.testing.assert_allclose(normalized_effect(stats[:, 0], base), [1.0, 0.0, 0.5])
    assert math.isclose(stats[0, 1], math.exp(2) / (math.exp(2) + 2), rel_tol=1e-6)  # p(correct), clean run
    assert abs(stats[0, 2]) < 1e-12 and stats[1, 2] > 0  # KL(clean ‖ clean) = 0, else positive


def test_tiny_gap_gives_nan_and_a_flag_never_inf():
    logits = torch.tensor([1.0, 1.0, 0.0])
    base = baseline(logits, logits + 1e-5, correct_id=0, incorrect_id=1)
    assert "tiny_ld_gap" in base.flags
    effect = normalized_effect(np.array([0.3, 0.0]), base)
    assert np.isnan(effect).all() and not np.isinf(effect).any()
