#!/usr/bin/env bash
# The reference width's train step (configs/reflex.py: n_embd 1536, 8 heads) compiled at 6, 12, 24
# and 48 layers, `all` (reflex_window 7) and `none`, deviceless for v5p:2x2x1 (fsdp 4) and for this
# CPU; one JSON line per finished row in $OUT, rows already there skipped (resumable).
# Usage: bash experiments/compile_time/reference_width.sh [OUT]
set -u
cd "$(dirname "$0")/../.."
OUT=${1:-experiments/compile_time/reference_width.jsonl}
touch "$OUT"
for target in v5p:2x2x1 cpu; do
  for layers in 12 48 6 24; do
    for plan in none all; do
      key="\"target\": \"$target\", \"set\": {\"model.n_layer\": \"$layers\", \"model.head_plan\": \"$plan\""
      grep -qF "$key" "$OUT" && continue
      mesh=()
      [ "$target" = cpu ] || mesh=(--set mesh.fsdp=4)
      python experiments/compile_time/measure.py "$target" \
        --set model.n_layer="$layers" --set model.head_plan="$plan" --set model.reflex_window=7 \
        "${mesh[@]}" | tail -1 >> "$OUT" || echo "failed: $target $layers $plan" >&2
    done
  done
done
