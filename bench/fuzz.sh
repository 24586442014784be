#!/usr/bin/env bash
# Long fuzzing runs (not part of CI): each target until 10,000,000 executions or
# MAX_SECONDS (default 1800), whichever comes first, JOBS targets at a time. The corpus
# each run grows is kept in fuzz/corpus/<target> (merged and minimised at the end), seeded
# from fuzz/seeds/<target>. A crash stops that target and is left in fuzz/artifacts/.
# Without a sanitizer (libFuzzer's coverage only): our crates forbid unsafe code, and the
# runs are 3-5x faster; the per-target summary goes to fuzz/runs/<target>.log.
#   bench/fuzz.sh [TARGET...]
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
MAX_SECONDS=${MAX_SECONDS:-1800}
RUNS=${RUNS:-10000000}
JOBS=${JOBS:-2}
targets=("$@")
[ "${#targets[@]}" -gt 0 ] || mapfile -t targets < <(RUSTC_BOOTSTRAP=1 cargo fuzz list)
export RUSTC_BOOTSTRAP=1
cargo fuzz build -s none
mkdir -p runs
run() {
  local t=$1
  mkdir -p "corpus/$t"
  local seeds=()
  [ -d "seeds/$t" ] && seeds=("seeds/$t")
  local start=$SECONDS
  if cargo fuzz run -s none "$t" "corpus/$t" "${seeds[@]}" -- \
      -runs="$RUNS" -max_total_time="$MAX_SECONDS" -print_final_stats=1 >"runs/$t.log" 2>&1; then
    status=ok
  else
    status=CRASH
  fi
  local runs edges
  runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "runs/$t.log" | grep -o '[0-9]*$' || echo '?')
  edges=$(grep -o 'cov: [0-9]*' "runs/$t.log" | tail -1 | grep -o '[0-9]*' || echo '?')
  # Keep the corpus small: only inputs that add coverage.
  mkdir -p "corpus/$t.min"
  cargo fuzz run -s none "$t" "corpus/$t.min" "corpus/$t" -- -merge=1 >/dev/null 2>&1 || true
  rm -rf "corpus/$t" && mv "corpus/$t.min" "corpus/$t"
  echo "$t: $status, $runs runs in $((SECONDS - start)) s, $edges edges, $(ls "corpus/$t" | wc -l) corpus files" | tee -a runs/summary.txt
}
for t in "${targets[@]}"; do
  while [ "$(jobs -r | wc -l)" -ge "$JOBS" ]; do sleep 5; done
  run "$t" &
done
wait
