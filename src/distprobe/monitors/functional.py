"""The maths of the label-free monitors: pure functions over tensors, no state, no collectives.

RankMe (Garrido et al. 2023, "RankMe: Assessing the downstream performance of pretrained self-supervised
representations by their rank", eq. 1) and LiDAR (Thilak et al. 2024, "LiDAR: Sensing linear probing performance in
joint embedding SSL architectures", eqs. 2-4) are both the exponential of the entropy of a normalised spectrum. Here
each is computed from sufficient statistics that are sums over samples (so that ranks and batches add up exactly),
never from the features themselves. See docs/monitors.md.
"""

from __future__ import annotations

import torch

#: The papers' epsilon added to each normalised value before the entropy (both use 1e-7).
EPSILON = 1e-7
#: LiDAR's regulariser of the within-class scatter (Thilak et al. 2024, section 3: delta = 1e-4).
DELTA = 1e-4


def effective_rank(spectrum: torch.Tensor, eps: float = EPSILON) -> torch.Tensor:
    """``exp(-sum_k p_k log p_k)`` with ``p_k = s_k / ||s||_1 + eps``: the smooth rank of a non-negative spectrum.

    Args:
        spectrum: Singular values or eigenvalues (1-D, non-negative; tiny negative round-off is clamped to 0).
        eps: Added to each normalised value, as in both papers; it keeps ``log`` finite for zero values.

    Returns:
        A 0-d tensor in ``spectrum``'s dtype; NaN when the spectrum sums to zero or holds a NaN.

    Example:
        >>> effective_rank(torch.tensor([1.0, 1.0, 1.0, 0.0]), eps=0.0)
        tensor(3.)
    """
    s = spectrum.clamp_min(0)
    p = s / s.sum() + eps
    return torch.exp(-(p * torch.log(p)).sum())


def gram_of_rows(rows: torch.Tensor) -> torch.Tensor:
    """``rows^T rows`` in float64: the sum of ``x x^T`` over the rows."""
    rows = rows.to(torch.float64)
    return rows.T @ rows


def rankme_from_sums(
    count: torch.Tensor, total: torch.Tensor, gram: torch.Tensor, *, centered: bool = False, eps: float = EPSILON
) -> torch.Tensor:
    """RankMe from ``count = N``, ``total = sum x`` and ``gram = sum x x^T`` over the N embeddings.

    The paper takes the singular values of the N x D embedding matrix Z; they are the square roots of the
    eigenvalues of ``Z^T Z = gram``. With ``centered=True`` Z's column means are removed first: the spectrum is then
    that of the covariance ``(gram - total total^T / N) / N`` (the scale cancels in the normalisation).

    Returns:
        A 0-d float64 tensor; NaN before any embedding.
    """
    scatter = gram - torch.outer(total, total) / count if centered else gram
    eigenvalues = torch.linalg.eigvalsh(_symmetric(scatter))
    return torch.where(count > 0, effective_rank(eigenvalues.clamp_min(0).sqrt(), eps), torch.nan)


def finite_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``rows`` with every row holding a NaN or inf zeroed, and which rows were finite ``(N, 1)``; no host sync.

    A zero row adds nothing to the sums, so leaving it out is only a matter of not counting it. Kept in, one NaN
    would make the whole Gram matrix NaN, and the epoch's value would be computed from a matrix of zeros in its place.
    """
    finite = torch.isfinite(rows).all(dim=1, keepdim=True)
    return torch.where(finite, rows, torch.zeros((), dtype=rows.dtype, device=rows.device)), finite


def per_sample_statistics(rows: torch.Tensor, sample_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Group ``rows`` by ``sample_ids`` (rows with one id are views of one source sample), without a host sync.

    The groups are found by sorting the ids, so their number never reaches the host: the buffers hold one slot per
    row, and slots no group uses stay empty.

    Args:
        rows: ``(B, D)`` embeddings of the views.
        sample_ids: ``(B,)`` integer ids of their source samples.

    Returns:
        ``(num_samples, num_views, sum_means, gram_means, within)`` in float64: the number of source samples, of
        views, the sum of the per-sample means, the sum of their outer products, and the within-sample scatter
        ``sum_i sum_j (x_ij - mu_i)(x_ij - mu_i)^T``.
    """
    rows = rows.to(torch.float64)
    order = torch.argsort(sample_ids, stable=True)
    sorted_ids = sample_ids[order]
    starts = torch.ones_like(sorted_ids, dtype=torch.long)
    starts[1:] = (sorted_ids[1:] != sorted_ids[:-1]).long()
    group = torch.empty_like(starts)
    group[order] = torch.cumsum(starts, 0) - 1  # each row's group index, in [0, B)
    # A sample with a non-finite value in any view is left out whole (its mean needs all its views): its rows are
    # zeroed and not counted, so its group stays an empty slot.
    rows, finite = finite_rows(rows)
    bad_views = torch.zeros(rows.shape[0], dtype=torch.float64, device=rows.device).index_add_(
        0, group, (~finite[:, 0]).to(torch.float64)
    )
    kept = (bad_views[group] == 0).to(torch.float64)
    rows = rows * kept.unsqueeze(1)
    sums = torch.zeros_like(rows).index_add_(0, group, rows)
    counts = torch.zeros(rows.shape[0], dtype=torch.float64, device=rows.device).index_add_(0, group, kept)
    means = sums / counts.clamp_min(1).unsqueeze(1)  # empty slots: zero rows, which add nothing below
    centred = rows - means[group]
    return (
        (counts > 0).sum().to(torch.float64),
        kept.sum(),  # the views counted, a device sum (no host scalar copied: that would stall the host on CUDA)
        means.sum(0),
        means.T @ means,
        centred.T @ centred,
    )


def lidar_from_sums(
    num_samples: torch.Tensor,
    num_views: torch.Tensor,
    sum_means: torch.Tensor,
    gram_means: torch.Tensor,
    within: torch.Tensor,
    *,
    delta: float = DELTA,
    eps: float = EPSILON,
) -> torch.Tensor:
    """LiDAR from the sums of `per_sample_statistics` over every batch and rank.

    With n source samples ("classes") and their views: the between-class scatter
    ``S_b = (sum_i mu_i mu_i^T - n mu mu^T) / (n - 1)`` around the mean of the class means ``mu``, the within-class
    scatter ``S_w = within / (num_views - n) + delta I`` (the paper's ``n (q - 1)`` for q views each), the LDA matrix
    ``S_w^{-1/2} S_b S_w^{-1/2}``, and the effective rank of its eigenvalues.

    Returns:
        A 0-d float64 tensor; NaN with fewer than two source samples or no second view.
    """
    n = num_samples
    mean = sum_means / n
    between = (gram_means - n * torch.outer(mean, mean)) / (n - 1)
    eye = torch.eye(within.shape[0], dtype=within.dtype, device=within.device)
    within_cov = within / (num_views - n) + delta * eye
    values, vectors = torch.linalg.eigh(_symmetric(within_cov))
    inv_sqrt = (vectors * values.clamp_min(torch.finfo(values.dtype).tiny).rsqrt()) @ vectors.T
    lda = inv_sqrt @ between @ inv_sqrt
    rank = effective_rank(torch.linalg.eigvalsh(_symmetric(lda)), eps)
    return torch.where((n > 1) & (num_views > n), rank, torch.nan)


def _symmetric(matrix: torch.Tensor) -> torch.Tensor:
    """Remove round-off asymmetry; a NaN/inf matrix becomes zeros so that the eigensolver cannot fail on it."""
    matrix = (matrix + matrix.T) / 2
    return torch.nan_to_num(matrix, nan=0.0, posinf=0.0, neginf=0.0)


def occurrence_index(ids: torch.Tensor) -> torch.Tensor:
    """For each row, how many earlier rows share its id: ``[0, 0, 1, 1, 0] -> [0, 1, 0, 1, 2]``, with no host sync.

    With view ids of views laid out one after another (``[view 0 of every sample, view 1 of every sample, ...]``,
    as multi-view SSL batches are concatenated), this is each row's source-sample index.
    """
    ids = ids.reshape(-1)
    order = torch.argsort(ids, stable=True)
    sorted_ids = ids[order]
    position = torch.arange(ids.numel(), device=ids.device)
    starts = torch.ones_like(sorted_ids, dtype=torch.bool)
    starts[1:] = sorted_ids[1:] != sorted_ids[:-1]
    group_start = torch.cummax(torch.where(starts, position, 0), 0).values
    index = torch.empty_like(position)
    index[order] = position - group_start
    return index
