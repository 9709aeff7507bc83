"""The logistic-regression protocol on a training set too small to hold out a share: a clear error, not a
ZeroDivisionError ("float division by zero") from a fit on no samples."""

from __future__ import annotations

import pytest
import torch

from distprobe.convex.logreg import logreg_grid


def test_one_training_sample_is_refused_with_the_reason():
    val = torch.randn(5, 4), torch.arange(5) % 2
    with pytest.raises(ValueError, match=r"logreg: 1 training sample\(s\) all fall in the held-out share"):
        logreg_grid(torch.randn(1, 4), torch.tensor([0]), *val, 2, c_grid=[0.1, 1.0])
    result = logreg_grid(torch.randn(2, 4), torch.tensor([0, 1]), *val, 2, c_grid=[0.1, 1.0])  # one fitted, one held
    assert result.best_c in (0.1, 1.0) and result.val_correct.shape == (5,)
