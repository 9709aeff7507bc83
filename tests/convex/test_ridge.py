import numpy as np
import pytest
import torch

from distprobe.convex import RidgeStatistics, fit_ridge

from .helpers import gaussian_classes


def numpy_ridge(x: np.ndarray, y: np.ndarray, num_classes: int, lam: float) -> tuple[np.ndarray, np.ndarray]:
    """min (1/n)||XW + 1b - Y||^2 + lam ||W||^2, b unpenalised: the normal equations on [X 1] in float64."""
    n, d = x.shape
    a = np.hstack([x, np.ones((n, 1))])
    targets = np.eye(num_classes)[y]
    penalty = np.diag([lam] * d + [0.0])
    theta = np.linalg.solve(a.T @ a / n + penalty, a.T @ targets / n)
    return theta[:d], theta[d]


@pytest.mark.parametrize("lam", [1e-6, 1e-2, 1.0, 100.0])
def test_every_lambda_equals_the_numpy_closed_form(lam):
    x, y, vx, _ = gaussian_classes(120, 50)
    stats = RidgeStatistics(6, 3)
    for start in range(0, 120, 32):  # batches summed one by one
        stats.update(x[start : start + 32].float(), y[start : start + 32])
    solution = stats.solve([0.5, lam])
    w, b = numpy_ridge(x.float().double().numpy(), y.numpy(), 3, lam)
    np.testing.assert_allclose(solution.weight[1].numpy(), w, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(solution.bias[1].numpy(), b, rtol=1e-7, atol=1e-9)
    expected = (vx.numpy() @ w + b).argmax(1)
    assert np.array_equal(solution.predict(vx)[1].numpy(), expected)


def test_zero_weight_rows_are_dropped_and_reset_forgets():
    x, y, _, _ = gaussian_classes(40, 1)
    kept = RidgeStatistics(6, 3)
    kept.update(x[:30], y[:30])
    weighted = RidgeStatistics(6, 3)
    weighted.update(x, y, weight=(torch.arange(40) < 30).double())
    torch.testing.assert_close(weighted.flat, kept.flat, rtol=1e-12, atol=1e-10)
    assert float(weighted.count) == 30
    weighted.reset()
    assert float(weighted.count) == 0 and not weighted.flat.any()


def test_state_dict_roundtrip_and_mismatch():
    x, y, _, _ = gaussian_classes(20, 1)
    stats = RidgeStatistics(6, 3)
    stats.update(x, y)
    restored = RidgeStatistics(6, 3)
    restored.load_state_dict(stats.state_dict())
    assert torch.equal(restored.flat, stats.flat)
    with pytest.raises(ValueError, match="dim=6, num_classes=3.*dim=5"):
        RidgeStatistics(5, 3).load_state_dict(stats.state_dict())


def test_bad_lambdas_and_widths_are_refused():
    x, y, _, _ = gaussian_classes(20, 1)
    with pytest.raises(ValueError, match=r"l2=\(-1.0,\); expected one or more values >= 0"):
        fit_ridge(x, y, 3, [-1.0])
    with pytest.raises(ValueError, match="features of width 6, expected 4"):
        RidgeStatistics(4, 3).update(x, y)


def test_lambda_zero_is_the_minimum_norm_least_squares():
    x, y, _, _ = gaussian_classes(5, 1, dim=8)  # fewer samples than features: X^T X is singular
    solution = fit_ridge(x, y, 3, [0.0])
    xc = x.numpy() - x.numpy().mean(0)
    yc = np.eye(3)[y.numpy()] - np.eye(3)[y.numpy()].mean(0)
    np.testing.assert_allclose(solution.weight[0].numpy(), np.linalg.pinv(xc) @ yc, atol=1e-8)


def test_ridge_keys_format_and_parse_back():
    from distprobe import keys

    logged = keys.key(keys.EVAL, "ridge", "top1", head=keys.ridge_head(1e-5))
    assert logged == "eval/ridge/l2=1e-05_top1"
    for names in ((), ("ridge",)):
        parsed = keys.parse(logged, names=names)
        assert parsed is not None and (parsed.probe, parsed.head, parsed.metric) == ("ridge", "l2=1e-05", "top1")
        assert keys.ridge_l2(parsed.head) == 1e-5
    assert keys.parse("eval/ridge_best_l2") == keys.LoggedKey("eval", "ridge", "l2", keys.BEST)
    assert keys.absolute_key("eval", "r", keys.relative_key("top1", head=keys.ridge_head(0.1))) == "eval/r/l2=0.1_top1"
