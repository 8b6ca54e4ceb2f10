#!/usr/bin/env bash
# The whole test suite with REFMOE_BACKEND=cupy on a machine with a CUDA GPU, in G pytest processes at once
# (the test files dealt out by size, largest first), so that it fits in one ten-minute device call.
#     bash tests/gpu_suite.sh [G]            # default G = 4; logs in $OUT (when set) or /tmp/refmoe_gpu_suite
# Prints each group's summary line and exits non-zero when any group failed.
set -u
cd "$(dirname "$0")/.."
G="${1:-4}"
LOGDIR="${OUT:-/tmp/refmoe_gpu_suite}"
mkdir -p "$LOGDIR"
mapfile -t FILES < <(ls -S tests/test_*.py)
[ "$G" -ge 1 ] 2>/dev/null || { echo "G must be an integer >= 1, got $G" >&2; exit 2; }
[ "$G" -le "${#FILES[@]}" ] || G=${#FILES[@]}
declare -a GROUP
for i in "${!FILES[@]}"; do
  GROUP[$(( i % G ))]+="${FILES[$i]} "
done
START=$(date +%s)
PIDS=()
for g in $(seq 0 $(( G - 1 ))); do
  # shellcheck disable=SC2086
  REFMOE_BACKEND=cupy python3 -m pytest -q -p no:cacheprovider -rfE --basetemp="$LOGDIR/tmp_$g" ${GROUP[$g]} \
    > "$LOGDIR/group_$g.log" 2>&1 &
  PIDS+=($!)
done
RC=0
for g in "${!PIDS[@]}"; do
  wait "${PIDS[$g]}" || RC=1
  echo "group $g: $(tail -n 1 "$LOGDIR/group_$g.log")"
done
grep -h "^FAILED\|^ERROR" "$LOGDIR"/group_*.log || true
echo "done in $(( $(date +%s) - START )) s, exit $RC"
exit $RC
