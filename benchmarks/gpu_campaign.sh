#!/usr/bin/env bash
# One GPU session's measurements, in priority order, inside a fixed time budget:
#   1. benchmarks/gpu_check.py (ViT-S/16 and ViT-B/16 presets, eager and compiled, synthetic
#      224 px: images/s, MFU, memory, launches, syncs), then ViT-S/16 with model.attention=cudnn
#   2. benchmarks/bench_encoder_options.py --device cuda (attention backends, checkpointing)
#   3. benchmarks/race_ijepa.py --device cuda (needs IJEPA=path of a facebookresearch/ijepa
#      checkout; skipped when unset)
#   4. the quickstart-budget variants (review study, regularisers, encoder options, other
#      grids), many at once on the one GPU, each trained and evaluated; no run starts after
#      DEADLINE seconds, and all are stopped at HARD_STOP seconds.
# Usage: FMNIST=DIR [IJEPA=DIR] benchmarks/gpu_campaign.sh OUT_DIR
# Results: OUT_DIR/{gpu_check,gpu_check_cudnn,race_gpu}.json, bench_encoder_options.md, summary.jsonl, campaign.log
# and runs.tar.gz (every run folder without its checkpoints, plus the viz PNGs of sigreg_s0).
set -u
out=${1:?usage: FMNIST=DIR [IJEPA=DIR] benchmarks/gpu_campaign.sh OUT_DIR}
: "${FMNIST:?set FMNIST to the folder holding the Fashion-MNIST .gz files}"
mkdir -p "$out"
work=${WORK:-/tmp/hjepa_gpu_campaign}
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
py=${PY:-python3}
start=$(date +%s)
log() { echo "[$(($(date +%s) - start)) s] $*"; }

log "$(nvidia-smi -L 2>&1 | head -1)"
log "gpu_check"
timeout 300 $py benchmarks/gpu_check.py --budget-s 200 --out "$out/gpu_check.json" > /dev/null
log "gpu_check model.attention=cudnn (the kernel auto used to pick)"
timeout 90 $py benchmarks/gpu_check.py --configs imagenet100_vits16:eager --budget-s 30 \
  --out "$out/gpu_check_cudnn.json" model.attention=cudnn > /dev/null
log "bench_encoder_options --device cuda"
timeout 45 $py benchmarks/bench_encoder_options.py --device cuda --batch 128 --repeats 5 \
  > "$out/bench_encoder_options.md"
if [ -n "${IJEPA:-}" ]; then
  log "race_ijepa --device cuda"
  timeout 40 $py benchmarks/race_ijepa.py --ijepa "$IJEPA" --device cuda --repeats 6 \
    --warmup 2 > "$out/race_gpu.json"
fi

left=$((${DEADLINE:-380} - ($(date +%s) - start)))
if [ "$left" -le 0 ]; then log "no time left for the variants"; exit 0; fi
log "variants"
v=benchmarks/variants
timeout $((${HARD_STOP:-535} - ($(date +%s) - start))) $py benchmarks/run_variants.py \
  $v/ablation.txt $v/regularizers.txt $v/encoder_options.txt $v/ablation_grids.txt \
  --skip-duplicates --out "$out" --runs "$work/runs" --device cuda \
  --parallel "${PARALLEL:-15}" --threads 1 \
  --deadline $((${DEADLINE:-380} - ($(date +%s) - start))) \
  --baselines-for baseline_s0 sigreg_s0 \
  --set "data.root=$FMNIST" train.precision=fp32
log "viz sigreg_s0"
timeout 20 $py -m hjepa viz "$work/runs/sigreg_s0" > /dev/null
log "pack"
tar -czf "$out/runs.tar.gz" -C "$work" --exclude=checkpoints --exclude='*.pt' runs
log "done"
