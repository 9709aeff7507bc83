"""A micro-batch of one sample on one process: each head of a bank still equals a separately trained probe.

A separate BatchNorm probe cannot train on one sample (torch's BatchNorm refuses it in training): distprobe skips its
window and leaves its running statistics alone (`Probe._untrainable_step`). Such batches are common: an epoch's last
batch (193 samples at batch 32). The bank's BatchNorm heads now do the same, while its heads without a BatchNorm
train on the sample, as separate linear probes do.
"""

import pytest
import torch
from tests.bank.test_bank_equivalence import OPTIMIZERS, _references, assert_heads_equal_references

from distprobe.bank import BankConfig, ProbeBank

D, C = 8, 4


def _stream(sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, D, generator=g) * 3 + 1, torch.randint(0, C, (n,), generator=g)) for n in sizes]


@pytest.mark.parametrize("optimizer", ["SGD", "AdamW"])
@pytest.mark.parametrize("accumulate", [1, 2])
def test_one_sample_batches_skip_the_batchnorm_heads_as_separate_probes(optimizer, accumulate):
    bank_opt, ref_kwargs = OPTIMIZERS[optimizer]
    config = BankConfig(
        name="grid",
        inputs=["x"],
        num_classes=C,
        lr=[0.3, 0.03],
        weight_decay=[0.0, 0.05],
        normalization=[None, "batchnorm"],
        optimizer=bank_opt,
        accumulate_grad_batches=accumulate,
        in_features=D,
    )
    bank = ProbeBank.build(config)
    refs = _references(bank, bank_opt, ref_kwargs, accumulate, None, "norm")
    sizes = [16, 1, 16, 16, 1, 16, 16, 16, 1, 1]  # windows of 2 hold one sample at steps 1, 4 and 8-9
    for x, y in _stream(sizes):
        bank.train_step([x], y)
        for ref in refs.values():
            ref.train_step(x, y)
    bank.settle()
    assert_heads_equal_references(bank, refs)
    skipped = {head.head_id: int(bank.skipped_steps[head.index]) for head in bank.heads.head_list}
    assert skipped == {head_id: int(ref.skipped_steps) for head_id, ref in refs.items()}
    batchnorm = [h.head_id for h in bank.heads.head_list if h.normalization == "batchnorm"]
    assert all(skipped[h] > 0 for h in batchnorm) and not any(v for h, v in skipped.items() if h not in batchnorm)
