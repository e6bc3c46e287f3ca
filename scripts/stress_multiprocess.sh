#!/usr/bin/env bash
# Issue #39's check: every test that starts several processes, N times in a row while one busy loop per core
# keeps the CPUs saturated (the contention under which a torchrun rank used to abort at exit).
#   scripts/stress_multiprocess.sh [N=50] [LOG=stress.log]
# One line per iteration ("iteration K: pass|FAIL (S s)"), failures' pytest output kept in LOG.fail.K, and a
# final count. Run it on an otherwise quiet machine; it takes about 3 minutes an iteration on 2 cores.
set -u
n=${1:-50}
log=${2:-stress.log}
python=${PYTHON:-.venv/bin/python}
tests=(
  "tests/test_cli.py::test_torchrun_two_processes_equal_one_process_on_the_combined_batch"
  "tests/test_curveball.py::test_torchrun_two_processes_equal_one_process_on_the_combined_batch"
  "tests/test_privacy.py::test_dp_sgd_under_torchrun_equals_one_process"
  "tests/test_reliability.py::test_torchrun_ranks_leave_the_group_cleanly_and_a_crash_does_not_hang"
  "tests/test_stobatch.py::test_two_process_distributed_average_equals_one_process_loop"
  "tests/test_stobatch.py::test_torchrun_stobatch_training_equals_one_process_with_two_workers"
)
busy=()
for _ in $(seq "$(nproc)"); do "$python" -c "while True: pass" & busy+=($!); done
trap 'kill "${busy[@]}" 2>/dev/null' EXIT
echo "$(date -u +%FT%TZ) $(git rev-parse --short HEAD 2>/dev/null) ${#busy[@]} busy loops, $n iterations" > "$log"
passed=0
for k in $(seq "$n"); do
  start=$(date +%s)
  if "$python" -m pytest -q -p no:cacheprovider -x "${tests[@]}" > "$log.out" 2>&1; then
    passed=$((passed + 1)); result=pass
  else
    result=FAIL; cp "$log.out" "$log.fail.$k"
  fi
  echo "iteration $k: $result ($(( $(date +%s) - start )) s)" >> "$log"
done
rm -f "$log.out"
echo "passed $passed of $n" >> "$log"
tail -1 "$log"
[ "$passed" -eq "$n" ]
