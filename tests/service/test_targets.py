"""`TargetCodec`: each kind of target is stored compactly and read back as the online probes receive it."""

from __future__ import annotations

import pytest
import torch

from distprobe.service.targets import TargetCodec


def test_multi_hot_vectors_keep_their_bad_values_as_bad_data():
    codec = TargetCodec("multilabel", 3)
    stored = codec.encode([[1.0, 0.0, 1.0], [0.5, 1.0, float("nan")], [2, 0, -1]], "train")
    assert stored.dtype == torch.uint8
    decoded = codec.decode(stored)
    assert decoded[0].tolist() == [1.0, 0.0, 1.0]
    assert decoded[1, 1] == 1.0 and not torch.isin(decoded[1, 0], torch.tensor([0.0, 1.0]))
    assert decoded[1, 2].isnan() and decoded[2, 0] not in (0.0, 1.0) and decoded[2, 2] not in (0.0, 1.0)


@pytest.mark.parametrize(
    ("classes", "dtype"), [(21, torch.uint8), (254, torch.uint8), (255, torch.int16), (40000, torch.int32)]
)
def test_masks_take_the_smallest_type_and_give_back_ignore_and_bad_labels(classes, dtype):
    codec = TargetCodec("mask", classes, ignore_index=-1)
    mask = torch.tensor([[0, classes - 1], [-1, classes + 7]])
    stored = codec.encode([mask, mask], "val")
    assert stored.dtype == dtype and tuple(stored.shape) == (2, 2, 2)
    decoded = codec.decode(stored)
    assert decoded.dtype == torch.int64
    assert decoded[0, 0].tolist() == [0, classes - 1] and int(decoded[1, 1, 0]) == -1
    assert not 0 <= int(decoded[0, 1, 1]) < classes and int(decoded[0, 1, 1]) != -1  # still bad data


def test_masks_of_different_sizes_are_refused_with_the_fix():
    codec = TargetCodec("mask", 4)
    with pytest.raises(ValueError, match=r"data.train has a torch.int64 mask of shape \(3, 3\) .* resize or crop"):
        codec.encode([torch.zeros(2, 2, dtype=torch.long), torch.zeros(3, 3, dtype=torch.long)], "train")
