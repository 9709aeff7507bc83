"""`OnlineKNN` in a real `lightning.Trainer` on 2 gloo ranks: a resumed fit predicts what the uninterrupted one did.

Lightning writes rank 0's callback state only: that state holds every rank's shard, and each rank takes its own
back. DDP runs in bf16-mixed (features arrive in bf16); FSDP2 through the ``distprobe_fsdp2`` strategy, FSDP1
through ``distprobe_fsdp``, DeepSpeed ZeRO-2 and ZeRO-3 through ``distprobe_deepspeed_stage_{2,3}``, and tensor
parallelism through ``distprobe_fsdp2`` on a 1 x 2 mesh: the features are DTensors, both ranks see the same batches
and each holds the whole buffer (its data-parallel group is itself). All fit in one set of spawned ranks (a spawn
costs seconds of CI).
"""

import pytest
from tests.helpers.dist import run_distributed
from tests.knn import lightning_scenario
from tests.strategies.scenario import Spec

pytestmark = pytest.mark.distributed

SPECS = {
    "ddp_bf16": Spec("distprobe_ddp", precision="bf16-mixed"),
    "fsdp1": Spec("distprobe_fsdp"),
    "fsdp2": Spec("distprobe_fsdp2", kind="fsdp2"),
    "deepspeed_stage_2": Spec("distprobe_deepspeed_stage_2"),
    "deepspeed_stage_3": Spec("distprobe_deepspeed_stage_3"),
    "fsdp2_tp_1x2": Spec(
        "distprobe_fsdp2", kind="tp", strategy_kwargs={"data_parallel_size": 1, "tensor_parallel_size": 2}
    ),
}
#: Each rank's shard rows and samples written after 2 epochs: 40 / 2 rows per rank and 2 x 16 samples under data
#: parallelism; the whole buffer and 2 x 32 samples on a data-parallel group of one.
FACTS = {"rows": 20, "written": 32}
FACTS_TP = {"rows": 40, "written": 64}


@pytest.fixture(scope="module")
def every_strategy(tmp_path_factory):
    return run_distributed(lightning_scenario.run_all, 2, SPECS, str(tmp_path_factory.mktemp("knn")))


@pytest.mark.parametrize("name", list(SPECS))
def test_resume_reproduces_the_uninterrupted_runs_predictions(name, every_strategy):
    results = [per_rank[name] for per_rank in every_strategy]
    for rank, result in enumerate(results):
        whole_preds, whole_logged, whole_facts = result["whole"]
        resumed_preds, resumed_logged, resumed_facts = result["resumed"]
        last = result["epochs"] - 1
        assert resumed_preds == [p for p in whole_preds if p[0] == last], rank
        assert resumed_logged[-1] == whole_logged[-1]
        assert resumed_facts == whole_facts == (FACTS_TP if name.startswith("fsdp2_tp") else FACTS)
        keys = {f"eval/knn_k{k}_top1" for k in lightning_scenario.KS} | {"eval/knn_top1"}
        assert set(whole_logged[-1]) == keys
        assert whole_logged[-1]["eval/knn_top1"] == whole_logged[-1]["eval/knn_k3_top1"]
    # Every rank logs the same reduced values.
    assert results[0]["whole"][1] == results[1]["whole"][1]
    if name.startswith("fsdp2_tp"):  # the same batches and the same whole buffer: the same predictions
        assert results[0]["whole"][0] == results[1]["whole"][0]
