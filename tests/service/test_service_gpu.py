"""On CUDA: `distprobe eval` extracts under bf16 autocast into the cache and trains the bank and kNN on the GPU.

Run with ``pytest -m gpu tests/service``; without CUDA these tests are skipped by the conftest.
"""

import json

import pytest
import torch
from tests.service.models import encoder, eval_config, labeled, pretrain

from distprobe.service.job import evaluate_checkpoint
from distprobe.service.store import ResultsStore

pytestmark = pytest.mark.gpu


def test_cuda_eval_caches_bf16_autocast_features_and_records_the_results(tmp_path):
    (checkpoint,) = pretrain(str(tmp_path / "run"), steps=10, every_n_steps=10)
    cache = tmp_path / "cache"
    config = eval_config(tmp_path / "eval.yaml", features={"keep": True, "cache_dir": str(cache)})
    summary = evaluate_checkpoint(checkpoint, config)
    assert summary["step"] == 10 and summary["rows"] == 10
    assert len(ResultsStore(summary["store"]).results(checkpoint)) == 10
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    backbone = encoder().cuda().eval()
    backbone.load_state_dict({k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")})
    (folder,) = cache.iterdir()
    meta = json.loads((folder / "val.json").read_text())
    cached = torch.from_file(str(folder / "val.features"), size=meta["size"] * meta["dim"]).view(meta["size"], -1)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        expected = backbone(labeled("val").points.cuda()).float().cpu()
    # The backbone ran under bf16 autocast: its output is bf16 (then stored as float32) ...
    assert torch.equal(cached, cached.bfloat16().float())
    # ... and is the batch-of-75 bf16 forward up to the kernels' batch-size-dependent rounding.
    torch.testing.assert_close(cached, expected, atol=2e-2, rtol=2e-2)
