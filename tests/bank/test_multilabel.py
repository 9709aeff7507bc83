"""Multi-label banks: BCE heads equal separate probes, bad labels are skipped and counted, F1 and mAP are
torchmetrics' on every sample, and 2 gloo ranks with an uneven, padded validation set equal one process."""

import copy

import pytest
import torch
import torch.distributed as dist
from tests.helpers.dist import run_distributed
from torchmetrics.functional.classification import multilabel_average_precision, multilabel_f1_score

from distprobe.bank import BankConfig, ProbeBank
from distprobe.bank.multilabel import MultiLabelBankMetrics
from distprobe.engine import Probe, ProbeConfig

D, C, B, N = 8, 5, 8, 4


def _config(family="linear", **overrides):
    options = dict(
        name="ml",
        family=family,
        inputs=["x"],
        num_classes=C,
        lr=[0.3, 0.03],
        weight_decay=[0.0, 0.01],
        in_features=D,
        multilabel=True,
        head_options={"num_heads": 2} if family == "attentive" else None,
    )
    options.update(overrides)
    return BankConfig(**options)


def _features(family, n, g):
    shape = (n, N, D) if family == "attentive" else (n, D)
    return torch.randn(*shape, generator=g)


def _data(family, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(_features(family, B, g), (torch.rand(B, C, generator=g) < 0.4).long()) for _ in range(steps)]


@pytest.mark.parametrize("family", ["linear", "attentive"])
def test_each_head_equals_a_separate_bce_probe(family):
    config = _config(
        family, optimizer={"type": "SGD", "momentum": 0.9}, accumulate_grad_batches=2, gradient_clip_val=1.0
    )
    if family == "attentive":
        config = _config(family, lr=[0.05, 0.005], optimizer="SGD", accumulate_grad_batches=2, gradient_clip_val=1.0)
    bank = ProbeBank.build(config)
    refs = {}
    for head in bank.heads.head_list:
        refs[head.head_id] = Probe.build(
            ProbeConfig(
                name=f"ref{head.index}",
                probe=copy.deepcopy(bank.head(head.head_id)).train(),
                optimizer={"type": "SGD", "lr": head.lr, "weight_decay": head.weight_decay, "momentum": 0.9},
                loss_fn=torch.nn.BCEWithLogitsLoss(),
                accumulate_grad_batches=2,
                gradient_clip_val=1.0,
            )
        )
    for x, y in _data(family, 6):
        bank.train_step([x], y)
        for ref in refs.values():
            ref.train_step(x, y.float())
    for head_id, ref in refs.items():
        got = dict(bank.head(head_id).named_parameters())
        for name, want in ref.module.named_parameters():
            torch.testing.assert_close(got[name], want.detach(), atol=1e-5, rtol=1e-5, msg=f"{head_id} {name}")


def test_train_f1_is_torchmetrics_and_labels_outside_0_1_are_skipped_and_counted():
    bank = ProbeBank.build(_config())
    data = _data("linear", 4)
    before = bank.heads.flat.detach().clone()
    bad_x, bad_y = data[0][0], data[0][1].clone()
    bad_y[0, 0] = 2  # out of {0, 1}
    logits = [bank.train_step([bad_x], bad_y).preds]
    nan_y = data[1][1].float()
    nan_y[1, 2] = float("nan")
    logits.append(bank.train_step([data[1][0]], nan_y).preds)
    assert torch.equal(bank.heads.flat, before), "a bad batch's step is skipped for every head"
    logits += [bank.train_step([x], y).preds for x, y in data[2:]]
    values = bank.compute_train_metrics()
    assert values["bad_batches/targets_out_of_range"] == 1 and values["bad_batches/nonfinite_targets"] == 1
    # F1 over the samples with good labels (a bad batch's other samples still count, as for class indices),
    # as torchmetrics has it.
    targets = torch.cat([bad_y, nan_y.nan_to_num(9).long(), *[y for _, y in data[2:]]])
    good = ((targets == 0) | (targets == 1)).all(dim=1)
    assert good.sum() == len(good) - 2
    preds, targets = torch.cat(logits).sigmoid()[good], targets[good]
    for k, head_id in enumerate(bank.head_ids):
        for average in ("micro", "macro"):
            want = multilabel_f1_score(preds[:, k], targets, C, average=average)
            torch.testing.assert_close(values[f"{head_id}_f1_{average}"], want)


def test_multilabel_options_are_checked():
    with pytest.raises(ValueError, match=r"bank 'ml': argument 'metrics' got \['top5'\] with multilabel=True"):
        _config(metrics=["top5"])
    assert list(_config(metrics=["f1_macro"]).top_k) == ["f1_macro"]  # the first listed chooses the best head
    bank = ProbeBank.build(_config())
    assert isinstance(bank.metrics, MultiLabelBankMetrics)


# --- exact evaluation over ranks ----------------------------------------------------------------------------------

VAL = 23  # odd: DistributedSampler pads rank 1 with a copy of sample 0, which must not be counted


def _validation(seed=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(VAL, D, generator=g)
    y = (torch.rand(VAL, C, generator=g) < 0.3).long()
    y[5] = 0  # a sample with no label, and (below) a bad one that is never counted
    y[7, 1] = 3
    return x, y


def _evaluate(bank, rank, world, batch=4):
    x, y = _validation()
    index = list(range(VAL)) + list(range(-VAL % world))  # the sampler's padding: repeats of the first samples
    mine = torch.tensor(index[rank::world])
    real = len(range(rank, VAL, world))
    bank.start_eval_epoch()
    for start in range(0, len(mine), batch):
        rows = mine[start : start + batch]
        bank.eval_step([x[rows]], y[rows], num_valid=max(0, min(len(rows), real - start)))
    return bank.compute_eval_metrics()


def _trained(group=None):
    bank = ProbeBank.build(_config(), dp_group=group)
    for xb, yb in _data("linear", 3):
        bank.train_step([xb], yb)  # every rank the same batches: the same heads as one process
    bank.settle()
    return bank


def _eval_worker(rank, world):
    bank = _trained(dist.group.WORLD)
    return _evaluate(bank, rank, world), bank.heads.flat.detach().clone()


@pytest.mark.distributed
@pytest.mark.slow
def test_map_on_two_ranks_with_an_uneven_validation_set_equals_torchmetrics_on_all_samples():
    results = run_distributed(_eval_worker, 2)
    one = _trained()
    expected = _evaluate(one, 0, 1)
    x, y = _validation()
    good = ((y == 0) | (y == 1)).all(dim=1)
    preds = one.predict([x]).sigmoid()
    for values, flat in results:
        assert torch.equal(flat, one.heads.flat)
        assert values.keys() == expected.keys()
        for key, value in expected.items():
            torch.testing.assert_close(values[key], value, msg=key)
        for k, head_id in enumerate(one.head_ids):
            want = multilabel_average_precision(preds[good, k], y[good], C, average="macro", thresholds=None)
            torch.testing.assert_close(values[f"{head_id}_mAP"], want)
            want_f1 = multilabel_f1_score(preds[good, k], y[good], C, average="macro")
            torch.testing.assert_close(values[f"{head_id}_f1_macro"], want_f1)


# --- in a real Trainer -------------------------------------------------------------------------------------------


class _Tagged(torch.utils.data.Dataset):
    """The tap tests' points with 3 multi-hot tags read off the input's signs (learnable from the tokens)."""

    def __init__(self, n, seed, bad_at=None):
        from features.taps.models import IN_DIM

        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, IN_DIM, generator=g)
        self.tags = (self.x[:, :3] > 0).long()
        if bad_at is not None:
            self.tags[bad_at, 0] = 2

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "tags": self.tags[i]}


def test_lightning_banks_with_multi_hot_targets_log_map_and_f1_for_every_head():
    from distprobe.callbacks import OnlineProbeBank
    from features.taps.models import TokenModel
    from helpers.models import trainer

    common = dict(target="tags", num_classes=3, multilabel=True, lr=[0.05, 0.005], optimizer="AdamW")
    attentive = OnlineProbeBank(
        None, name="att", input="backbone.blocks.1:tokens", head="attentive", head_options={"num_heads": 2}, **common
    )
    linear = OnlineProbeBank(None, name="lin", input="b1_cls_mean", **common)
    loader = torch.utils.data.DataLoader(_Tagged(24, 0, bad_at=5), batch_size=4)
    val = torch.utils.data.DataLoader(_Tagged(10, 1), batch_size=4)
    t = trainer([attentive, linear], max_epochs=2)
    t.fit(TokenModel(seed=0), loader, val)
    logged = t.callback_metrics
    for bank in (attentive, linear):
        for head_id in bank.head_ids:
            for metric in ("mAP", "f1_micro", "f1_macro"):
                assert 0.0 <= float(logged[f"eval/{bank.name}/{head_id}_{metric}"]) <= 1.0
            assert 0.0 <= float(logged[f"train/{bank.name}/{head_id}_f1_macro"]) <= 1.0
        assert bank.best_head_id == bank.head_ids[int(logged[f"eval/{bank.name}_best_head"])]
        assert f"eval/{bank.name}_best_mAP" in logged
        # The batch holding a tag of 2 was skipped and counted, once per epoch.
        assert float(logged[f"train/{bank.name}_bad_batches/targets_out_of_range"]) == 2
    assert attentive.bank.heads.in_features == {"backbone.blocks.1:tokens": 6}


def test_lightning_refuses_class_index_targets_for_a_multilabel_bank():
    from distprobe.callbacks import OnlineProbeBank
    from features.taps.models import IN_DIM, TokenModel
    from helpers.models import RandomPoints, trainer

    bank = OnlineProbeBank(None, name="ml", input="b1_cls_mean", target="label", num_classes=3, multilabel=True)
    loader = torch.utils.data.DataLoader(RandomPoints(8, 0, in_dim=IN_DIM, num_classes=3), batch_size=4)
    with pytest.raises(
        ValueError, match=r"bank 'ml': with multilabel=True the target must be a \(batch, num_classes=3"
    ):
        trainer([bank], max_epochs=1).fit(TokenModel(seed=0), loader)
