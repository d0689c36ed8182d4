#!/usr/bin/env bash
# Leave-one-domain-out runs of several methods and seeds, JOBS at a time (small students leave
# a GPU mostly idle, so several runs share it well), then the DomainBed-style table from
# `dgkit bench dg`, which finds the finished runs and reuses them. Run it again after an
# interruption: finished runs are skipped and interrupted ones resume from their checkpoint.
#
#   bench/dg_parallel.sh DATA OUT METHODS SEEDS JOBS [dgkit distill options...]
#   bench/dg_parallel.sh ../shared/datasets/PACS runs/dg erm,psd 2 8 --steps 2500
set -uo pipefail
DATA=$1 OUT=$2 METHODS=$3 SEEDS=$4 JOBS=$5
shift 5
DGKIT=${DGKIT:-dgkit}
mkdir -p "$OUT/runs" "$OUT/logs"
EXTRA="$*"  # distill options, passed to every run and to the table
export DATA OUT DGKIT EXTRA
one() {
  local method=$1 seed=$2 domain=$3
  local name="$method-seed$seed-$domain"
  local run="$OUT/runs/$name"
  [ -f "$run/summary.json" ] && grep -q '"finished": true' "$run/summary.json" && return
  if [ -f "$run/checkpoint.pt" ]; then  # interrupted earlier: continue from its last checkpoint
    $DGKIT distill --resume "$run" --quiet >> "$OUT/logs/$name.log" 2>&1
  else
    $DGKIT distill --data "$DATA" --target "$domain" --method "$method" --seed "$seed" \
      --out "$run" --overwrite --quiet $EXTRA > "$OUT/logs/$name.log" 2>&1
  fi || echo "failed: $name (see $OUT/logs/$name.log)"
}
export -f one
for method in ${METHODS//,/ }; do
  for seed in $(seq 0 $((SEEDS - 1))); do
    for domain in $(ls "$DATA"); do echo "$method $seed $domain"; done
  done
done | xargs -P "$JOBS" -L 1 bash -c 'one "$@"' _
# shellcheck disable=SC2086
$DGKIT bench dg --data "$DATA" --methods "$METHODS" --seeds "$SEEDS" --out "$OUT" --quiet $EXTRA
