#!/usr/bin/env bash
# Every GPU check of the wave-2 issues as one run (about 10 minutes on one H100 / H200), for a session that is lent a
# GPU: run it at once, in one call. Needs on the GPU machine: torch, transformers, accelerate, peft, tokenizers (the
# device image has them) and the wheels of what it lacks (diffusers, open_clip_torch, ftfy, wcwidth, webdataset,
# braceexpand, importlib_metadata, lazy-importer), carried in .whl/ (see the device tool's README for `pip download`),
# and Tiny Shakespeare at .gpu/tinyshakespeare.txt (copied from ../shared/data; .gpu/ and .whl/ git-ignored locally).
#
#   bash bench/gpu_checks.sh OUT [PART ...]     # PART: estimate clip lm lm-variants fsdp sd (default: all)
#
# OUT gets at most 8 files: estimate.json, clip.json, lm.json, lm_variants.json, fsdp.log, sd.json, log.txt.
# 2026-11-26 on one H100 (docs/benchmarks.md, "One H100"): estimate 30 s, clip 50 s, lm 85 s, fsdp 40 s, sd 190 s.
set -u
OUT=${1:?usage: bash bench/gpu_checks.sh OUT [PART ...]}; shift
PARTS=${*:-estimate clip lm lm-variants fsdp sd}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
DATA=${SHAKESPEARE:-.gpu/tinyshakespeare.txt}
DEVICE=${DEVICE:-cuda} LM_STEPS=${LM_STEPS:-1000} LM_EXTRA=${LM_EXTRA:-}  # a CPU smoke test: DEVICE=cpu LM_STEPS=4 ...
SCRATCH=$(mktemp -d)
log() { echo "[$(date -u +%T)] $*" | tee -a "$OUT/log.txt"; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee -a "$OUT/log.txt"
for part in $PARTS; do
  log "start $part"
  case $part in
    estimate) timeout 120 python3 bench/gpu_estimate.py --out "$OUT/estimate.json" >> "$OUT/log.txt" 2>&1 ;;
    clip) timeout 150 python3 bench/gpu_scale.py --only clip --data "$DATA" --out "$SCRATCH/clip" >> "$OUT/log.txt" 2>&1 \
            && cp "$SCRATCH/clip/clip_vitb32.json" "$OUT/clip.json" ;;
    lm) timeout 240 python3 bench/gpu_scale.py --only lm --data "$DATA" --out "$SCRATCH/lm" --run-dir "$SCRATCH/lm-run" \
            >> "$OUT/log.txt" 2>&1 && cp "$SCRATCH/lm/lm_gpu.json" "$OUT/lm.json" ;;
    lm-variants)  # why train.compile was slower on the small GPU recipe (1.16M vs 1.48M tokens/s): 1000 steps each
      echo "{" > "$OUT/lm_variants.json"
      for variant in "eager:" "compile:train.compile=true" "eager-nodropout:model.dropout=0.0" \
                     "compile-nodropout:train.compile=true model.dropout=0.0"; do
        name=${variant%%:*}; overrides=${variant#*:}
        timeout 150 python3 bench/gpu_scale.py --only lm --device "$DEVICE" --data "$DATA" --lm-steps "$LM_STEPS" \
          --out "$SCRATCH/$name" --run-dir "$SCRATCH/$name-run" $overrides train.eval_every=500 $LM_EXTRA \
          >> "$OUT/log.txt" 2>&1
        python3 -c "import json,sys; r=json.load(open('$SCRATCH/$name/lm_gpu.json')); print(json.dumps('$name')+': '+json.dumps({k: r[k] for k in ('tokens_per_s','mfu','wall_s','final_val_loss')})+',')" \
          >> "$OUT/lm_variants.json" 2>> "$OUT/log.txt"
      done
      echo '"done": true}' >> "$OUT/lm_variants.json" ;;
    fsdp) timeout 150 python3 bench/gpu_fsdp.py "$SCRATCH/fsdp" > "$OUT/fsdp.log" 2>&1 ;;
    sd) timeout 330 python3 bench/stable_diffusion.py --gpu --out "$OUT/sd.json" >> "$OUT/log.txt" 2>&1 ;;
    *) log "unknown part $part" ;;
  esac
  log "end $part (exit $?)"
done
grep -E "PASS|FAIL|failure" "$OUT/fsdp.log" 2>/dev/null | tail -16
grep -E "^pipelines|^one CFG|^25-step|estimate/measured|^step .*val/loss" "$OUT/log.txt" | tail -30
cat "$OUT/lm_variants.json" 2>/dev/null
