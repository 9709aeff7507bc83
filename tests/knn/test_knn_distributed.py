"""The sharded kNN on 2 and 4 real gloo ranks equals one dense kNN over the union buffer, for every k.

Each rank's shard holds its own rank's training samples; the reference's buffer holds every rank's last
``capacity`` samples of the same stream (tests/knn/reference.py). Cases: a buffer not yet full, one that wrapped
(several times), one shorter than a batch; features on a lattice (many exactly equal scores, so ties at the top-k
boundary and between class votes are common) and Gaussian ones; bf16 and fp16 storage; uneven query batches and
sampler padding (``num_valid``).
"""

import pytest
import torch
from tests.helpers.dist import run_distributed
from tests.knn.reference import dense_knn, union_buffer

from distprobe.knn import KNNConfig, ShardedKNN

pytestmark = pytest.mark.distributed

D, C = 12, 5
KS = (10, 1, 3, 20)

#: name: (queue_length per world... given as per-rank capacity, train batch, train steps, storage dtype, lattice)
CASES = {
    "not_full": dict(capacity=40, batch=6, steps=3, dtype="float32", lattice=True),
    "wrapped": dict(capacity=16, batch=6, steps=7, dtype="float32", lattice=True),
    "wrapped_gaussian": dict(capacity=16, batch=6, steps=7, dtype="float32", lattice=False),
    "shorter_than_batch": dict(capacity=5, batch=8, steps=3, dtype="float32", lattice=True),
    "fewer_than_k": dict(capacity=3, batch=2, steps=1, dtype="float32", lattice=True),
    "bf16": dict(capacity=16, batch=6, steps=5, dtype="bfloat16", lattice=False),
    "fp16": dict(capacity=16, batch=6, steps=5, dtype="float16", lattice=True),
}


def _features(n, generator, lattice):
    if not lattice:
        return torch.randn(n, D, generator=generator)
    # Unit vectors with four entries of +-0.5: all dot products are exact multiples of 1/4 in any summation order.
    x = torch.zeros(n, D)
    for row in range(n):
        cols = torch.randperm(D, generator=generator)[:4]
        x[row, cols] = torch.where(torch.rand(4, generator=generator) < 0.5, -0.5, 0.5)
    return x


def _stream(case, rank, seed):
    g = torch.Generator().manual_seed(seed * 100 + rank)
    n = case["batch"] * case["steps"] + rank  # uneven streams: rank r pushes r more samples (one extra batch)
    return _features(n, g, case["lattice"]), torch.randint(0, C, (n,), generator=g)


def _queries(case, rank, seed):
    g = torch.Generator().manual_seed(seed * 100 + 50 + rank)
    n = 7 + 2 * rank  # uneven query batches
    return _features(n, g, case["lattice"]), torch.randint(0, C, (n,), generator=g)


def _run(rank, world, seed):
    out = {"resume": _resume(rank, world)} if world == 2 else {}
    for name, case in CASES.items():
        config = KNNConfig(
            name=name, num_classes=C, queue_length=case["capacity"] * world, k=KS, storage_dtype=case["dtype"]
        )
        knn = ShardedKNN.build(config, in_features=D)
        x, y = _stream(case, rank, seed)
        for start in range(0, case["batch"] * case["steps"], case["batch"]):
            knn.update(x[start : start + case["batch"]], y[start : start + case["batch"]])
        knn.update(x[case["batch"] * case["steps"] :], y[case["batch"] * case["steps"] :])
        q, t = _queries(case, rank, seed)
        num_valid = q.shape[0] - (rank % 2)  # odd ranks end with one padded sample
        preds = knn.eval_step(q, t, num_valid=num_valid)
        out[name] = {
            "preds": preds,
            "metrics": knn.compute_eval_metrics(),
            "nbytes": knn.buffer_nbytes,
            "rows": knn.shard.features.shape[0],
        }
    return out


@pytest.fixture(scope="module")
def two_rank_results():
    """One spawn for every 2-rank check (a spawn costs seconds of CI)."""
    return run_distributed(_run, 2, 2)


@pytest.mark.parametrize("world", [2, 4])
def test_sharded_knn_equals_one_dense_knn_over_the_union_buffer(world, request):
    seed = world
    results = request.getfixturevalue("two_rank_results") if world == 2 else run_distributed(_run, world, seed)
    for name, case in CASES.items():
        dtype = getattr(torch, case["dtype"])
        buffer, labels = union_buffer([_stream(case, r, seed) for r in range(world)], case["capacity"], dtype)
        correct = torch.zeros(len(KS))
        total = 0
        for rank in range(world):
            q, t = _queries(case, rank, seed)
            expected = dense_knn(q, buffer, labels, KS, C, temperature=0.07)
            got = results[rank][name]["preds"]
            assert torch.equal(got, expected), (name, rank, got, expected)
            valid = q.shape[0] - (rank % 2)
            correct += (expected[:valid] == t[:valid, None]).sum(0)
            total += valid
            # Memory per rank: queue_length / world rows, never the whole buffer.
            assert results[rank][name]["rows"] == case["capacity"]
            element = torch.empty((), dtype=dtype).element_size()
            assert results[rank][name]["nbytes"] == case["capacity"] * (D * element + 8)
        for rank in range(world):  # exact metrics: each valid sample once, the same value on every rank
            metrics = results[rank][name]["metrics"]
            torch.testing.assert_close(metrics["top1"], correct[0] / total)
            for i, k in enumerate(KS):
                torch.testing.assert_close(metrics[f"k{k}_top1"], correct[i] / total)


def _resume(rank, world):
    case = CASES["wrapped"]
    config = KNNConfig(name="knn", num_classes=C, queue_length=case["capacity"] * world, k=KS)
    x, y = _stream(case, rank, 0)
    q, t = _queries(case, rank, 0)
    whole = ShardedKNN.build(config, in_features=D)
    first = ShardedKNN.build(config, in_features=D)
    half = 3 * case["batch"]
    whole.update(x[:half], y[:half])
    first.update(x[:half], y[:half])
    state = first.state_dict()  # rank 0's holds every shard; every rank loads rank 0's
    states = [None] * world
    torch.distributed.all_gather_object(states, state)
    resumed = ShardedKNN.build(config, in_features=D)
    resumed.load_state_dict(states[0])
    whole.update(x[half:], y[half:])
    resumed.update(x[half:], y[half:])
    return whole.eval_step(q, t), resumed.eval_step(q, t), sorted(state["shards"])


def test_resume_from_rank_zeros_state_gives_each_rank_its_shard_and_the_same_predictions(two_rank_results):
    for rank, result in enumerate(two_rank_results):
        whole, resumed, saved_ranks = result["resume"]
        assert torch.equal(whole, resumed)
        assert saved_ranks == ([0, 1] if rank == 0 else [rank])
