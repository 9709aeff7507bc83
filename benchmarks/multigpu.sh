#!/usr/bin/env bash
# Issue 7: multi-GPU validation with NCCL. Usage:
#
#   bash benchmarks/multigpu.sh [checks|overhead|all] [world sizes...]     # default: all, sizes 1 2 4 8
#   bash benchmarks/multigpu.sh checks 1 2
#   STRATEGIES="distprobe_fsdp2" ROUNDS=8 STEPS=40 bash benchmarks/multigpu.sh overhead 1 2
#
# checks:   for every world size and strategy (DDP, FSDP1, FSDP2, ZeRO-2, ZeRO-3; bf16-mixed), probe replicas bitwise
#           identical, exact eval metric, probe all-reduce bytes per step (a DDP comm hook) - multigpu_check.py - then
#           equivalence with the 1-GPU run on the same global batches, within bf16 tolerance (needs world size 1).
# overhead: the step-time overhead of 1 and 8 probes at each world size, under each strategy (overhead.py).
#
# World sizes above the GPU count are skipped. NVLink multicast stays off. Expects the packages of benchmarks/h100.sh's
# `setup` stage (run it first on a bare machine). Measured on 2 H100s: checks about 2 minutes per world size,
# overhead about 5 (allow more for larger world sizes: each run starts NCCL).
set -uo pipefail
OUT=${OUT:-bench-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH=$PWD/src:/tmp/site${PYTHONPATH:+:$PYTHONPATH}
MODE=all
case ${1:-} in checks | overhead | all) MODE=$1 && shift ;; esac
SIZES=${*:-1 2 4 8}
usage="usage: multigpu.sh [checks|overhead|all] [sizes...]"
for n in $SIZES; do
    if ! [[ $n =~ ^[1-9][0-9]*$ ]]; then
        echo "multigpu.sh: world size '$n' is not a positive integer; $usage" >&2
        exit 2
    fi
done
# ROUNDS and STEPS lengthen the overhead runs (default 3 x 20).
ROUNDS=${ROUNDS:-3}
STEPS=${STEPS:-20}
for var in ROUNDS STEPS; do
    if ! [[ ${!var} =~ ^[1-9][0-9]*$ ]]; then
        echo "multigpu.sh: $var='${!var}' is not a positive integer; e.g. ROUNDS=8 STEPS=40" >&2
        exit 2
    fi
done
# STRATEGIES="distprobe_fsdp distprobe_fsdp2" narrows a run to some strategies (a call to the device is time-limited).
KNOWN="distprobe_ddp distprobe_fsdp distprobe_fsdp2 distprobe_deepspeed_stage_2 distprobe_deepspeed_stage_3"
STRATEGIES=${STRATEGIES:-$KNOWN}
for s in $STRATEGIES; do
    if ! [[ " $KNOWN " == *" $s "* ]]; then
        echo "multigpu.sh: STRATEGIES names '$s'; choose from: $KNOWN" >&2
        exit 2
    fi
done
GPUS=$(nvidia-smi -L | wc -l)
status=0
for n in $SIZES; do
    if ((n > GPUS)); then
        echo "skip world size $n: $GPUS GPUs here"
        continue
    fi
    for s in $STRATEGIES; do
        if [[ $MODE != overhead ]]; then
            echo "=== check $s on $n GPUs"
            torchrun --standalone --nproc_per_node="$n" benchmarks/multigpu_check.py --strategy "$s" \
                --out "$OUT/check-$s-$n.json" 2>&1 | tee "$OUT/check-$s-$n.log" | grep -E '^\{|Error|error:' || status=1
        fi
        if [[ $MODE != checks ]]; then
            echo "=== overhead $s on $n GPUs"
            torchrun --standalone --nproc_per_node="$n" benchmarks/overhead.py --workload vit --strategy "$s" \
                --variants none,distprobe_x1,distprobe_x8 --rounds "$ROUNDS" --steps "$STEPS" \
                --json "$OUT/overhead-$s-$n.json" 2>&1 | tee "$OUT/overhead-$s-$n.log" | grep -E '^\| [nd]|failed' || status=1
        fi
    done
done
if [[ $MODE != overhead ]]; then
    echo "=== equivalence with 1 GPU, replicas, exact eval, communication"
    python3 benchmarks/multigpu_check.py --compare "$OUT"/check-*.json || status=1
fi
exit $status
