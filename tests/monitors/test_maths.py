"""RankMe and LiDAR from summed statistics against a direct SVD / eigendecomposition of the concatenated features."""

import pytest
import torch

from distprobe.monitors import LiDAR, RankMe, build_monitor, effective_rank
from distprobe.monitors.functional import DELTA, EPSILON


def direct_rankme(z, centered=False, eps=EPSILON):
    z = z.double()
    if centered:
        z = z - z.mean(0)
    s = torch.linalg.svdvals(z)
    p = s / s.sum() + eps
    return torch.exp(-(p * p.log()).sum())


def direct_lidar(views, delta=DELTA, eps=EPSILON):
    """Thilak et al. 2024, eqs. 2-4, on (n, q, D) views, with the eigenvalues of S_w^-1 S_b (same spectrum)."""
    views = views.double()
    n, q, d = views.shape
    mu_i = views.mean(1)
    mu = mu_i.mean(0)
    between = (mu_i - mu).T @ (mu_i - mu) / (n - 1)
    centred = (views - mu_i[:, None]).reshape(-1, d)
    within = centred.T @ centred / (n * (q - 1)) + delta * torch.eye(d, dtype=torch.float64)
    lam = torch.linalg.eigvals(torch.linalg.solve(within, between)).real.clamp_min(0)
    p = lam / lam.sum() + eps
    return torch.exp(-(p * p.log()).sum())


def low_rank_views(n=40, q=3, d=12, rank=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(rank, d, generator=g)
    centres = torch.randn(n, rank, generator=g) @ basis * torch.linspace(3, 0.1, d)
    return centres[:, None] + 0.3 * torch.randn(n, q, d, generator=g) + 0.5


def test_effective_rank_of_flat_and_one_hot_spectra():
    assert effective_rank(torch.ones(7, dtype=torch.float64), eps=0.0).item() == pytest.approx(7.0)
    assert effective_rank(torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)).item() == pytest.approx(1.0, abs=1e-5)
    assert torch.isnan(effective_rank(torch.zeros(3)))


@pytest.mark.parametrize("centered", [False, True])
def test_rankme_from_batches_equals_the_svd_of_all_features(centered):
    views = low_rank_views()
    z = views.reshape(-1, views.shape[-1])
    metric = RankMe(z.shape[1], centered=centered)
    for chunk in z.split(17):
        metric.update(chunk)
    torch.testing.assert_close(metric.compute(), direct_rankme(z, centered), atol=1e-6, rtol=1e-6)


def test_rankme_of_a_rank_deficient_embedding():
    z = torch.randn(64, 3, dtype=torch.float64) @ torch.randn(3, 10, dtype=torch.float64)
    metric = RankMe(10)
    metric.update(z)
    torch.testing.assert_close(metric.compute(), direct_rankme(z), atol=1e-4, rtol=1e-4)
    assert metric.compute().item() < 3.0 + 1e-3


def test_lidar_from_batches_equals_the_direct_lda():
    views = low_rank_views()
    metric = LiDAR(views.shape[-1])
    for chunk in views.split(7):  # every sample's views in one update
        metric.update(chunk)
    torch.testing.assert_close(metric.compute(), direct_lidar(views), atol=1e-6, rtol=1e-6)


def test_lidar_with_shuffled_rows_and_sample_ids_equals_the_view_tensor():
    views = low_rank_views(n=12, q=4, d=6)
    n, q, d = views.shape
    ids = torch.arange(100, 100 + n).repeat_interleave(q)  # any integer ids, e.g. dataset indices
    perm = torch.randperm(n * q, generator=torch.Generator().manual_seed(3))
    rows_metric, views_metric = LiDAR(d), LiDAR(d)
    rows_metric.update(views.reshape(-1, d)[perm], ids[perm])
    views_metric.update(views)
    torch.testing.assert_close(rows_metric.compute(), views_metric.compute(), atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(rows_metric.compute(), direct_lidar(views), atol=1e-6, rtol=1e-6)


def test_nan_before_data_and_reset():
    rankme, lidar = RankMe(4), LiDAR(4)
    with pytest.warns(UserWarning, match="before the ``update`` method"):
        assert torch.isnan(rankme.compute())
    lidar.update(torch.randn(1, 3, 4))  # one sample: no between-class scatter
    assert torch.isnan(lidar.compute())
    lidar.reset()
    assert lidar.num_samples.item() == 0


def test_errors_name_the_argument_and_the_fix():
    with pytest.raises(ValueError, match="expected one of \\['lidar', 'rankme'\\]"):
        build_monitor("rank_me", 4)
    with pytest.raises(ValueError, match="'dim' got 0"):
        RankMe(0)
    with pytest.raises(ValueError, match="no sample ids"):
        LiDAR(4).update(torch.randn(5, 4))
    with pytest.raises(ValueError, match="3 sample ids for 5 embedding rows"):
        LiDAR(4).update(torch.randn(5, 4), torch.arange(3))
    with pytest.raises(ValueError, match="shape \\(batch, dim\\)"):
        RankMe(4).update(torch.randn(5))
