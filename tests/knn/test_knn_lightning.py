"""`OnlineKNN` in a real `lightning.Trainer` on 2 gloo ranks: a resumed fit predicts what the uninterrupted one did.

Lightning writes rank 0's callback state only: that state holds every rank's shard, and each rank takes its own
back. DDP runs in bf16-mixed (features arrive in bf16); FSDP2 through the ``distprobe_fsdp2`` strategy.
"""

import pytest
from tests.helpers.dist import run_distributed
from tests.knn import lightning_scenario
from tests.strategies.scenario import Spec

pytestmark = pytest.mark.distributed

SPECS = {
    "ddp_bf16": Spec("distprobe_ddp", precision="bf16-mixed"),
    "fsdp2": Spec("distprobe_fsdp2", kind="fsdp2"),
}


@pytest.mark.parametrize("name", list(SPECS))
def test_resume_reproduces_the_uninterrupted_runs_predictions(name, tmp_path):
    results = run_distributed(lightning_scenario.run, 2, SPECS[name], str(tmp_path))
    for rank, result in enumerate(results):
        whole_preds, whole_logged, whole_facts = result["whole"]
        resumed_preds, resumed_logged, resumed_facts = result["resumed"]
        last = result["epochs"] - 1
        assert resumed_preds == [p for p in whole_preds if p[0] == last], rank
        assert resumed_logged[-1] == whole_logged[-1]
        assert resumed_facts == whole_facts == {"rows": 20, "written": 32}  # 40 / 2 rows per rank; 2 epochs x 16
        keys = {f"eval/knn_k{k}_top1" for k in lightning_scenario.KS} | {"eval/knn_top1"}
        assert set(whole_logged[-1]) == keys
        assert whole_logged[-1]["eval/knn_top1"] == whole_logged[-1]["eval/knn_k3_top1"]
    # Every rank logs the same reduced values.
    assert results[0]["whole"][1] == results[1]["whole"][1]
