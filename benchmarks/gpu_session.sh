#!/usr/bin/env bash
# One call of the `device` tool (a borrowed GPU machine, see results/camvid/README.md): the CUDA
# training-step figures, then a chunk of the CamVid run that resumes from the run folder's exact
# state, and that run folder tarred into $OUT in parts the tool can bring back.
#
# Here, once:       python benchmarks/pack_camvid.py ../shared/datasets/camvid .camvid_pack
#                   echo /.camvid_pack/ >> .git/info/exclude
# On the device:    run(command="bash benchmarks/gpu_session.sh", carry=[".camvid_pack"],
#                       timeout_s=590)
# Back here:        cat FILES_AT/run.tar.part-* | tar -x -C weights/
#                   then evaluate on the original PNGs and publish (results/camvid/README.md).
#
# The machine has PyTorch, torchvision, safetensors, tqdm, TensorBoard and matplotlib but not
# this package, hence PYTHONPATH=src and `python3 -m tiramisu`. Settings (environment):
#   RUN     run folder to resume or start     (weights/camvid_fcdensenet56)
#   CONFIG  its config when it starts fresh   (configs/camvid_fcdensenet56.yaml)
#   LIMIT_S the call's timeout_s              (590)
#   BENCH   1: CUDA step figures first (~2-3 min), 0: train only
set -uo pipefail
: "${OUT:?run through the device tool, which sets OUT}"
RUN=${RUN:-weights/camvid_fcdensenet56}
CONFIG=${CONFIG:-configs/camvid_fcdensenet56.yaml}
LIMIT_S=${LIMIT_S:-590}
BENCH=${BENCH:-1}
DATA=${DATA:-.camvid_pack}
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 TQDM_MININTERVAL=20
start=$(date +%s)
elapsed() { echo $(($(date +%s) - start)); }

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 -c "import torch, torchvision as tv; print(torch.__version__, tv.__version__)"
} 2>&1 | tee "$OUT/env.txt"
[ -d "$DATA/train" ] || { echo "gpu_session: $DATA/train missing (carry .camvid_pack)"; exit 2; }

if [ "$BENCH" = 1 ]; then
    # Fresh process per row: torch.cuda.max_memory_allocated covers that configuration alone.
    timeout 200 python3 benchmarks/train_step.py --device cuda \
        --models fcdensenet103 fcdensenet56 --sizes 224x224 360x480 \
        --modes naive_fp32 efficient_fp32 naive_bf16_cl efficient_bf16_cl --steps 10 \
        --json "$OUT/cuda_step.json" 2>&1 | tee "$OUT/cuda_step.log"
fi

# What is left, less the final evaluation's margin (the deadline covers it) and the packing.
left=$((LIMIT_S - $(elapsed) - 45))
if [ "$left" -lt 60 ]; then
    echo "gpu_session: only ${left}s left for training; skipped"
else
    resume=()
    [ -f "$RUN/last.pt" ] && resume=(--resume)
    python3 -m tiramisu train --config "$CONFIG" --data-root "$DATA" --out "$RUN" "${resume[@]}" \
        --set "train.max_minutes=$(python3 -c "print(round($left / 60, 2))")" \
        --set train.whole_epochs=true --set train.amp=auto --set train.channels_last=auto \
        2>&1 | tee "$OUT/train.log"
fi

# Parts under the tool's 16 MiB per file; the flock file stays behind.
tar -C "$(dirname "$RUN")" --exclude=.lock --exclude='.*.tmp' -cf - "$(basename "$RUN")" |
    split -b 15M - "$OUT/run.tar.part-"
ls -l "$OUT"
echo "gpu_session: done in $(elapsed)s"
