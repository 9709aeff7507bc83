#!/usr/bin/env bash
# Why a ViT-B step under DDP on 2 GPUs took 2.3x the 1-GPU step (docs/benchmarks.md, issue 7), no probe involved:
# the baseline under Lightning's own `ddp` and under `distprobe_ddp`, with OMP_NUM_THREADS as torchrun sets it (1) and
# raised, GPU memory and utilisation sampled per GPU, then a profile of rank 0. Expects benchmarks/h100.sh's `setup`.
#
#   bash benchmarks/ddp_scaling.sh [world size, default 2]
set -uo pipefail
OUT=${OUT:-bench-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH=$PWD/src:/tmp/site${PYTHONPATH:+:$PYTHONPATH}
N=${1:-2}
if ! [[ $N =~ ^[1-9][0-9]*$ ]]; then
    echo "ddp_scaling.sh: world size '$N' is not a positive integer; usage: ddp_scaling.sh [world size]" >&2
    exit 2
fi
BENCH="benchmarks/overhead.py --workload vit --variants none --rounds 2 --steps 20"

nvidia-smi --query-gpu=index,utilization.gpu,memory.used --format=csv,noheader,nounits -lms 500 >"$OUT/smi.csv" &
smi=$!
for strategy in ddp distprobe_ddp; do
    for threads in 1 8; do
        echo "=== $strategy, $N GPUs, OMP_NUM_THREADS=$threads"
        OMP_NUM_THREADS=$threads timeout 120 torchrun --standalone --nproc_per_node="$N" $BENCH --strategy $strategy \
            2>&1 | grep -E "round"
    done
done
kill $smi
echo "=== per GPU while those ran: peak memory (MiB), mean utilisation (%) over samples with memory in use"
awk -F', ' '$3 > 1000 {n[$1]++; u[$1] += $2} $3 > m[$1] {m[$1] = $3}
    END {for (g in m) printf "GPU %s: peak %d MiB, mean util %.0f%% (%d samples)\n", g, m[g], u[g] / n[g], n[g]}' \
    "$OUT/smi.csv"
echo "=== profile of rank 0 (distprobe_ddp, no probe)"
timeout 150 torchrun --standalone --nproc_per_node="$N" benchmarks/overhead.py --workload vit --steps 10 \
    --strategy distprobe_ddp --profile none >"$OUT/ddp-profile.log" 2>&1
grep -E "^wall" "$OUT/ddp-profile.log"
grep -A16 "by self device time" "$OUT/ddp-profile.log" | cut -c1-170
