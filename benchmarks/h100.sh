#!/usr/bin/env bash
# The single-GPU session of docs/benchmarks.md, one stage per argument, on a machine with torch + CUDA.
#
#   bash benchmarks/h100.sh setup tests syncs vit        # first call
#   bash benchmarks/h100.sh setup resnet strategies precision
#   bash benchmarks/h100.sh setup gpu-tests knn own-data   # the kNN, monitors and own-data stages
#   bash benchmarks/h100.sh setup cuda-suite floors         # the torch floor: every CUDA test + the floors' CPU tests
#   bash benchmarks/h100.sh setup levers-vit levers-resnet  # issue 28: the bank's levers, profile and exactness
#   bash benchmarks/h100.sh setup families                  # issues 25, 26: attentive and dense head families
#
# `setup` installs the wheels carried in .whl/ (lightning, torchmetrics, deepspeed built from its source
# distribution, stable-pretraining and the few of its dependencies the benchmark runs) into /tmp/site; distprobe
# itself is imported from ./src (no build step, so the machine's setuptools version does not matter). Logs and JSON
# go to $OUT (or ./bench-out).
set -uo pipefail
OUT=${OUT:-bench-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src:/tmp/site${PYTHONPATH:+:$PYTHONPATH}
PY=python3
BENCH="env PYTHONPATH=/tmp/site-bench:$PYTHONPATH $PY benchmarks/overhead.py"

stage() {
    local name=$1
    shift
    echo "=== $name: $*"
    local t0=$SECONDS
    "$@" 2>&1 | tee "$OUT/$name.log" | grep -v -E "^(GPU available|TPU available|LOCAL_RANK|💡|.*Trainer.fit. stopped|HPU available)"
    echo "=== $name: exit ${PIPESTATUS[0]} in $((SECONDS - t0)) s"
}

for what in "$@"; do
    case $what in
    setup)
        nvidia-smi -L
        # stable-pretraining goes to its own folder, used by the benchmark stages only: once installed it adds 14
        # callbacks to *every* Lightning Trainer through an entry point (and they need kornia), tests included.
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            $(ls .whl/*.whl | grep -v stable_pretraining) || exit 1
        # Only the peer-comparison stages need it: without its wheel, the other stages still run.
        if ls .whl/stable_pretraining-*.whl >/dev/null 2>&1; then
            $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site-bench \
                .whl/stable_pretraining-*.whl || exit 1
        fi
        $PY -c "import torch, lightning, torchmetrics, distprobe; print(torch.__version__, lightning.__version__,
torchmetrics.__version__, torch.cuda.get_device_name())"
        ;;
    tests) stage tests $PY -m pytest -p no:cacheprovider -m gpu tests/engine tests/bank -q -rs ;;
    syncs) stage syncs $BENCH --sync-check --workload resnet --json "$OUT/syncs.json" ;;
    vit) stage vit $BENCH --workload vit --json "$OUT/vit.json" ;;
    resnet) stage resnet $BENCH --workload resnet --rounds 10 --steps 50 --json "$OUT/resnet.json" ;;
    diag) stage diag $BENCH --workload resnet --rounds 8 --steps 50 \
        --variants none,distprobe_x1,nolog_x1,distprobe_x8,nolog_x8 --json "$OUT/diag.json" ;;
    strategies)
        for s in distprobe_fsdp distprobe_fsdp2 distprobe_deepspeed_stage_2 distprobe_deepspeed_stage_3; do
            stage "strategy-$s" $BENCH --workload vit --strategy "$s" --rounds 2 --steps 15 \
                --variants none,distprobe_x1,distprobe_x8 --json "$OUT/strategy-$s.json"
        done
        ;;
    precision)
        for p in 16-mixed 32-true; do
            stage "precision-$p" $BENCH --workload vit --precision "$p" --rounds 2 --steps 15 \
                --variants none,distprobe_x1,spt_none,spt_x1 --json "$OUT/precision-$p.json"
        done
        ;;
    profile-*) # profile-WORKLOAD-VARIANT
        w=${what#profile-}
        stage "$what" $BENCH --workload "${w%%-*}" --profile "${w#*-}"
        ;;
    multigpu) stage multigpu bash benchmarks/multigpu.sh checks 1 ;;
    # Every CUDA-marked test: the probe, the kNN buffer, the monitors, the exact metrics (issue 14).
    gpu-tests) stage gpu-tests $PY -m pytest -p no:cacheprovider -m gpu tests/engine tests/bank tests/knn tests/monitors tests/metrics \
        -q -rs ;;
    # The sharded kNN against an all-gather kNN on one GPU, up to 1M x 768 (docs/benchmarks.md, "Sharded kNN").
    knn)
        for d in bfloat16 float32; do
            stage "knn-$d" $PY benchmarks/knn_memory.py --device cuda --worlds 1 --sizes 65536 262144 1048576 \
                --dim 768 --queries 512 --rounds 5 --storage-dtype "$d"
        done
        ;;
    # The probing service (issue 16): its CUDA test, then extraction vs a bare loop, bank epochs, a whole job.
    service)
        stage service-tests $PY -m pytest -p no:cacheprovider -m gpu tests/service -q -rs
        stage service $PY benchmarks/probing_service.py --device cuda --json "$OUT/service.json"
        ;;
    # The torch floor (issue 28): every CUDA-marked test of the suite, on this machine's torch.
    cuda-suite) stage cuda-suite $PY -m pytest -p no:cacheprovider -m gpu tests/engine tests/bank tests/knn tests/monitors \
        tests/metrics tests/service tests/callbacks -q -rs ;;
    # ...and `make test-floors`' selection (FLOORS_TESTS and FLOORS_SKIP, read from the Makefile) on this torch, on
    # the CPU (CUDA hidden, as CI runs it), 8 workers; failures are run again alone to tell a real failure from a
    # clash of parallel workers.
    floors)
        local_tests=$($PY -c "import re; t = open('Makefile').read().replace('\\\\\n', ' ')
print(' '.join(re.search(r'^FLOORS_TESTS := (.*)$', t, re.M)[1].split()), '|',
      ' '.join(re.search(r'^FLOORS_SKIP := (.*)$', t, re.M)[1].split()))")
        stage floors env CUDA_VISIBLE_DEVICES= $PY -m pytest -q -n "${FLOORS_WORKERS:-8}" ${local_tests%%|*} ${local_tests#*|}
        stage floors-rerun env CUDA_VISIBLE_DEVICES= $PY -m pytest -q --lf --lfnf=none ${local_tests%%|*} \
            ${local_tests#*|}
        # What the selection leaves out because CI's two environments share one torch (see the Makefile): the
        # engine and ProbeSet on torch.distributed alone, and the repeated clean-exit runs.
        stage floors-extra env CUDA_VISIBLE_DEVICES= $PY -m pytest -q -n 8 -p no:cacheprovider \
            tests/engine/test_probe_ddp.py tests/engine/test_probe_real_use.py tests/loop/test_probe_set.py \
            tests/engine/test_clean_exit.py \
            tests/strategies/test_ddp_spawn.py::test_repeated_ddp_spawn_fits_with_a_probe_all_exit_cleanly
        ;;
    # Issue 28: a 64-head bank beside a plain-torch training step, each lever alone and together.
    levers-*) stage "$what" $PY benchmarks/bank_levers.py --workload "${what#levers-}" --json "$OUT/$what.json" \
        ${LEVERS_ARGS:-} ;;
    # Issues 25 and 26: attentive heads (bank, 16 probes, bare floor), the dense bank online, the dense service epoch.
    families) stage families $PY benchmarks/head_families.py --workload attentive,dense,dense-epoch \
        --json "$OUT/families.json" ${FAMILIES_ARGS:-} ;;
    # Issue 28: the Lightning table (none, 1 and 8 OnlineProbes, the 64-head bank and its lever variants).
    table-*) stage "$what" $BENCH --workload "${what#table-}" --rounds "${ROUNDS:-3}" --steps "${STEPS:-20}" \
        --variants "${VARIANTS:-none,distprobe_x1,distprobe_x8,distprobe_bank64plain}" --json "$OUT/$what.json" ;;
    bank-syncs) stage bank-syncs $BENCH --sync-check --workload resnet \
        --variants "${VARIANTS:-distprobe_x1,distprobe_x8,distprobe_bank64plain}" --json "$OUT/bank-syncs.json" ;;
    own-data) stage own-data $PY benchmarks/own_data.py --accelerator gpu --precision bf16-mixed --batch 1024 \
        --width 2048 --rounds 5 --steps 40 ;;
    *) echo "unknown stage $what" && exit 2 ;;
    esac
done
