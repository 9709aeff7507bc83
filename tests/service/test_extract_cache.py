"""A cached split marked complete is reused only if its files hold every row: a truncated or deleted file is redone.

The cache is memory-mapped, and mapping a short file grows it with zeros: a requeued job used to reuse a truncated
``train.features`` (or a deleted ``train.labels``) as rows of zero features (or class 0), and report numbers from them.
"""

from __future__ import annotations

import pytest
import torch
from tests.service.models import encoder, labeled

from distprobe.service.extract import extract_split


def _extract(cache):
    torch.manual_seed(0)
    split = extract_split(
        encoder(),
        labeled("train"),
        split="train",
        cache=cache,
        stamp={"checkpoint": "c.ckpt", "config": "h"},
        forward=None,
        input_key=0,
        label_key=1,
        batch_size=32,
        num_workers=0,
        device=torch.device("cpu"),
    )
    return split.features.clone(), split.labels.clone()


@pytest.mark.parametrize(("damaged", "how"), [("features", "truncate"), ("labels", "delete"), ("features", "extend")])
def test_a_damaged_cache_file_is_extracted_again(tmp_path, caplog, damaged, how):
    features, labels = _extract(tmp_path)
    path = tmp_path / f"train.{damaged}"
    if how == "truncate":
        with path.open("r+b") as handle:
            handle.truncate(100)
    elif how == "delete":
        path.unlink()
    else:
        with path.open("ab") as handle:
            handle.write(b"\0" * 8)
    again_features, again_labels = _extract(tmp_path)
    assert torch.equal(again_features, features) and torch.equal(again_labels, labels)
    assert f"{path} holds" in caplog.text and "extracting it again" in caplog.text


def test_a_whole_cache_is_reused(tmp_path, caplog):
    caplog.set_level("INFO")
    first = _extract(tmp_path)
    again = _extract(tmp_path)
    assert torch.equal(first[0], again[0]) and "Reusing the complete train features" in caplog.text


@pytest.mark.parametrize("marker", ["[]", "{}", '{"stamp": {"checkpoint": "c.ckpt", "config": "h"}}', "{not json"])
def test_a_damaged_marker_is_extracted_again(tmp_path, caplog, marker):
    """A marker of the wrong shape used to raise AttributeError or KeyError in the job instead of redoing the split."""
    features, labels = _extract(tmp_path)
    (tmp_path / "train.json").write_text(marker)
    again_features, again_labels = _extract(tmp_path)
    assert torch.equal(again_features, features) and torch.equal(again_labels, labels)
    if marker != "{}":  # no stamp is another extraction's marker: redone without a word, as before
        assert "is not one this service wrote: extracting it again" in caplog.text
