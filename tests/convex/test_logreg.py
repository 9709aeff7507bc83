import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from distprobe.convex import DINOV3_C_GRID, Standardizer, fit_logreg, logreg_grid

from .helpers import gaussian_classes


@pytest.mark.parametrize("c", [1e-3, 0.1, 10.0])
def test_fit_equals_scikit_learn_at_the_same_c(c):
    x, y, vx, _ = gaussian_classes(300, 100, num_classes=4)
    scaler = Standardizer.fit(x)
    x, vx = scaler(x), scaler(vx)
    model = fit_logreg(x, y, 4, c)
    reference = LogisticRegression(C=c, tol=1e-12, max_iter=10_000).fit(x.numpy(), y.numpy())
    np.testing.assert_allclose(model.weight.T.numpy(), reference.coef_, atol=1e-4)
    # The multinomial bias is defined up to a shift common to every class: compare them centred.
    bias = model.bias.numpy()
    np.testing.assert_allclose(bias - bias.mean(), reference.intercept_ - reference.intercept_.mean(), atol=1e-4)
    assert np.array_equal(model.predict(vx).numpy(), reference.predict(vx.numpy()))


def test_default_grid_is_dinov3s():
    assert len(DINOV3_C_GRID) == 45
    assert DINOV3_C_GRID[0] == pytest.approx(1e-6) and DINOV3_C_GRID[-1] == pytest.approx(1e5)
    ratios = np.diff(np.log10(DINOV3_C_GRID))
    np.testing.assert_allclose(ratios, 11 / 44)


def test_c_is_chosen_on_train_only_and_the_refit_reported_on_val():
    x, y, vx, vy = gaussian_classes(200, 120)
    grid = [1e-4, 1e-2, 1.0, 100.0]
    result = logreg_grid(x, y, vx, vy, 3, c_grid=grid, chain=2)
    poisoned = logreg_grid(x, y, vx, (vy + 1) % 3, 3, c_grid=grid, chain=2)
    assert torch.equal(result.holdout_top1, poisoned.holdout_top1)
    assert result.best_c == poisoned.best_c
    assert torch.equal(result.model.weight, poisoned.model.weight)
    assert result.val_top1 != poisoned.val_top1  # the poison does reach the reported number
    assert result.best_c == grid[int(result.holdout_top1.argmax())]
    # The reported model is the refit on all of train at the chosen C, standardised with all of train.
    refit = fit_logreg(Standardizer.fit(x)(x), y, 3, result.best_c)
    assert torch.equal(refit.weight, result.model.weight)
    assert result.val_correct.shape == (120,)
    assert result.val_top1 == pytest.approx(float((refit.predict(Standardizer.fit(x)(vx)) == vy).double().mean()))


def test_bad_arguments_are_refused():
    x, y, vx, vy = gaussian_classes(30, 10)
    with pytest.raises(ValueError, match="C=0.0; expected C > 0"):
        fit_logreg(x, y, 3, 0.0)
    with pytest.raises(ValueError, match="holdout=1.5; expected a fraction"):
        logreg_grid(x, y, vx, vy, 3, holdout=1.5)
