"""`OnlineKNN` in one process: a tapped submodule as input equals the same activations given as an output key;
the keys it logs and writes; a buffer shorter than a batch; bf16 storage."""

import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader

from distprobe.callbacks import OnlineKNN
from features.taps.models import IN_DIM, NUM_CLASSES, TokenModel
from helpers.models import RandomPoints, trainer


def _loader(size, seed):
    return DataLoader(RandomPoints(size, seed, in_dim=IN_DIM, num_classes=NUM_CLASSES), batch_size=4)


def test_tapped_input_equals_the_output_key_and_logs_every_k():
    options = dict(target="label", num_classes=NUM_CLASSES, queue_length=3, k=(2, 1), storage_dtype="bfloat16")
    tapped = OnlineKNN(None, name="tapped", input="backbone.proj:cls+mean", **options)
    explicit = OnlineKNN(None, name="explicit", input="proj_cls_mean", **options)
    seen = []

    class Record(Callback):
        def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, *_):
            seen.append((batch["tapped_preds"].clone(), batch["explicit_preds"].clone()))

    t = trainer([tapped, explicit, Record()], max_epochs=2)
    t.fit(TokenModel(seed=0), _loader(24, 0), _loader(10, 1))
    assert seen and all(torch.equal(a, b) for a, b in seen)
    assert tapped.knn.shard.features.dtype == torch.bfloat16 and tapped.knn.shard.capacity == 3  # < batch of 4
    logged = t.callback_metrics
    for name in ("tapped", "explicit"):
        assert set(k for k in logged if k.startswith(f"eval/{name}")) == {
            f"eval/{name}_top1",
            f"eval/{name}_k2_top1",
            f"eval/{name}_k1_top1",
        }
    assert float(logged["eval/tapped_top1"]) == float(logged["eval/explicit_k2_top1"])
