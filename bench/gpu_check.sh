#!/usr/bin/env bash
# bench/gpu_check.sh: every check that needs a GPU, in one call. The first thing a session with a GPU runs.
#
# A task that draws a GPU gets 15 minutes of device time in all (machine start, idle and transfers included) and
# at most 10 minutes per command, so the checks go in two calls, the second at once after the first (a warm
# machine keeps the build and Triton's cache; within its idle window), each under GPU_CHECK_BUDGET:
#   1. correctness and verification first (what makes compiled kernels eligible for dispatch):
#        run(command="LORA_KERNELS_COMMIT=<sha> GPU_CHECK_STEPS='nvidia-smi build env pytest sanitize memcheck synccheck tune' bash bench/gpu_check.sh", timeout_s=590)
#   2. the benchmarks the issues quote:
#        run(command="LORA_KERNELS_COMMIT=<sha> GPU_CHECK_BUDGET=300 GPU_CHECK_STEPS='build sgmv linear merge vce dual backward serve overhead racecheck pool' bash bench/gpu_check.sh", timeout_s=320)
# with <sha> the output of `git rev-parse HEAD` pasted in on this side (the copy the GPU machine receives may
# have no .git; without it the JSON says "unknown"). Then give the machine back. One call with every step also
# works (the default) but the budget runs out before the later steps.
#
# Steps (each logs to logs/<step>.log, runs under its own time cap, and the script goes on past failures):
#     nvidia-smi  the GPU, driver, clocks (read only: never changes the card's settings)
#     build       pip install --no-build-isolation --no-deps -e .  (the CUDA extension; timed)
#     env         lora-bench env (versions, backends and why not)
#     pytest      pytest -m cuda, test files sharded over PYTEST_JOBS=6 processes (junit XML: junit.xml); includes
#                 the persistent add_lora_ kernel on the GPU (tests/test_plan.py: values, bitwise-repeatable
#                 split-K sums, pre-bound launch == plain launch, counters reset, CUDA graph replay == eager)
#     sanitize    bench/sanitize_ops.py without the sanitizer: correctness, and it fills Triton's cache
#     memcheck    compute-sanitizer --tool memcheck  on bench/sanitize_ops.py, then on the decode kernel's cuda tests
#                 (tests/test_cuda.py -k decode_kernel: lora_kernels_C::sgmv_decode_, csrc/sgmv_decode.cu, every
#                 dtype, mixed mode, fused slices, -1 tokens, vector and scalar variants, rank 256, T 1..64)
#     racecheck   compute-sanitizer --tool racecheck on bench/sanitize_ops.py, then on the decode and fused kernels' bf16 tests
#     synccheck   compute-sanitizer --tool synccheck on the decode and fused kernels' bf16 tests (its last-block-finishes
#                 protocol: block barriers after an early exit, warp shuffles)
#     sgmv        lora-bench sgmv over every case (sgmv.json; also copied to bench/results/<gpu>/)
#     linear      lora-bench linear (issue 15): the decode sweep T = 1..64 of a LoRA'd 4096 x 4096 linear (8 adapters
#                 r = 16, bf16): base GEMV alone, base + add_lora_, vLLM-style base + memset + shrink + expand, the
#                 CUDA fused_lora_linear_ and base + sgmv_decode_ (verified or not: the rows say which); us, launches
#                 per call, % of the bytes bound, ratio to the base GEMV (linear.json inside logs.tar.gz; copy to
#                 bench/results/<gpu>/linear-<date>.json; its table is printed at the end)
#     merge       lora-bench merge: merge/unmerge per 7B shape and the 32-layer model switch (merge.json; also
#                 copied to bench/results/<gpu>/)
#     backward    lora-bench backward: fwd+bwd tokens/s of the multi-adapter delta, 64 adapters of mixed ranks, vs
#                 a per-adapter loop (backward.json, returned inside logs.tar.gz to stay under the 8-file limit;
#                 on this side copy it to bench/results/<gpu>/backward-<date>.json). The cuda tests of the
#                 backward (tests/test_lora_backward.py) run in the pytest step.
#     dual        lora-bench dual: Dual-LoRA r = 32 on 4096 -> 4096, fwd and fwd+bwd vs PyTorch and torch.compile,
#                 time and peak memory (dual.json inside logs.tar.gz; copy to bench/results/<gpu>/dual-<date>.json).
#                 Its cuda tests (tests/test_dual_lora.py) run in the pytest step.
#     serve       lora-bench serve: decode-step latency of a patched 2-layer 4096-wide Llama with 32 adapters vs
#                 PEFT's mixed batch, eager and CUDA graphs (serve.json inside logs.tar.gz; copy to
#                 bench/results/<gpu>/serve-<date>.json). Its cuda tests (tests/test_integrations_hf.py: the
#                 DecodeGraph replay) run in the pytest step.
#     tune        lora-bench tune (tune.json report, and the table itself: tuning-<gpu>.json)
#     vce         lora-bench vce: deform_pool fwd and fwd+bwd at the VCE shapes (B 1 and 8) vs grid_sample, its
#                 torch.compile and an fp32 Deformable-DETR-style kernel (vce.json inside logs.tar.gz; copy to
#                 bench/results/<gpu>/vce-<date>.json). Its cuda tests (tests/test_deform.py) run in the pytest step,
#                 its kernels in the sanitize steps, and tune verifies "deform_cuda". Unvalidated metadata that
#                 points outside value (tests/test_deform_guard.py -m cuda; sanitize_ops run_deform_bad_metadata
#                 under memcheck) must give the reference's result with no out-of-range access.
#     pool        python/many_adapters.py: 1,000 PEFT adapters on disk, a 64-slot AdapterPool, Zipf requests,
#                 side-stream prefetch; hit rate, prefetch stalls and ms/step in logs/pool.log (and the summary)
#     engines     the engine conformance tests on the GPU (tests/test_vllm_plugin.py, tests/test_sglang_plugin.py: our
#                 vLLM wrapper / SGLang backend vs the engines' own Triton kernels, compiled for the GPU instead of
#                 the CPU interpreter); they skip when vllm / sglang are not installed (pip install --no-deps -r
#                 requirements-engines.txt adds them in ~1 min)
#     overhead    lora-bench overhead: host us per call of add_lora_/shrink/expand_/LoRALinear/lora_linear, kernels
#                 stubbed (CPU tensors) and real eager CUDA launches (T=1, 4096, bf16), fast path vs dispatcher
#                 (overhead.json inside logs.tar.gz; copy to bench/results/<gpu>/overhead-<date>.json)
#
# What comes back in $OUT (at most 8 files may come back from the device machine): summary.txt, logs.tar.gz
# (every step's log), junit.xml, sgmv.json, merge.json, tune.json, tuning-<gpu>.json. Afterwards, on this side: copy
# sgmv.json to bench/results/<gpu>/sgmv-<date>.json (merge.json likewise) and tuning-<gpu>.json to lora_kernels/tuning/<gpu>.json
# (the name `lora-bench env` prints), then commit. The summary and the sgmv table are printed last.
#
# Environment: OUT (default ./out/gpu_check), PYTHON (default python3), GPU_CHECK_BUDGET (seconds, default
# 560), GPU_CHECK_STEPS (default: all, in the order above), CAP_<step> (a step's cap in seconds, e.g.
# CAP_tune=200), MAX_JOBS (compile jobs, default nproc), LORA_KERNELS_COMMIT (recorded in the JSON),
# TUNE_MAX_CONFIGS (candidates per bucket, default 8: each costs a Triton compile).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
REPO=$PWD
OUT=${OUT:-$REPO/out/gpu_check}
LOGS=$OUT/logs
mkdir -p "$LOGS"
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET:-560}
RESERVE=15 # seconds kept for packing the results
START=$(date +%s)
STEPS=${GPU_CHECK_STEPS:-"nvidia-smi build env pytest sanitize memcheck racecheck synccheck sgmv linear merge backward tune dual serve pool vce overhead engines"}
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export MAX_JOBS=${MAX_JOBS:-$(nproc 2>/dev/null || echo 8)}
export OUT REPO PY LOGS

# Default caps (seconds): maxima; a step that ends early leaves its time to the later ones.
declare -A CAP=([nvidia-smi]=15 [build]=180 [env]=40 [pytest]=150 [sanitize]=60 [memcheck]=90 [racecheck]=75
                [synccheck]=30 [sgmv]=130 [linear]=75 [merge]=90 [backward]=60 [tune]=150 [dual]=60 [serve]=90 [pool]=60 [vce]=100 [overhead]=45
                [engines]=120)
SUMMARY=()
FAILED=()

sanitizer() {
  command -v compute-sanitizer 2>/dev/null && return
  for p in /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda/compute-sanitizer/compute-sanitizer; do
    [ -x "$p" ] && { echo "$p"; return; }
  done
  echo compute-sanitizer
}

time_budget() {  # time_budget N: a bench's --time-budget, the step's cap less N seconds of start-up, at least 10
  local t=$(( STEP_LIMIT - $1 ))
  echo $(( t > 10 ? t : 10 ))
}
keep_result() {  # keep_result FILE NAME: a GPU run's JSON also goes to bench/results/<gpu>/NAME-<date>.json
  # (a GPU run only: a CPU smoke result names no GPU and stays out of bench/results/)
  [ -f "$1" ] || return 0
  local gpu
  gpu=$("$PY" -c 'import json,sys; from lora_kernels.bench.envinfo import gpu_slug; d=json.load(open(sys.argv[1])); print(gpu_slug(d["gpu"]["name"]) if d.get("gpu") else "")' "$1")
  if [ -n "$gpu" ]; then
    mkdir -p "bench/results/$gpu" && cp "$1" "bench/results/$gpu/$2-$(date +%Y%m%d-%H%M%S).json"
  fi
}
bench_kept() {  # bench_kept NAME FILE ARGS...: lora-bench NAME --out FILE ARGS..., then keep_result FILE NAME;
  # returns the bench's exit status
  local name=$1 file=$2
  shift 2
  "$PY" -m lora_kernels "$name" --out "$file" "$@"
  local rc=$?
  keep_result "$file" "$name"
  return $rc
}
do_nvidia_smi() {
  nvidia-smi
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem,clocks.max.sm,temperature.gpu,power.draw,pstate --format=csv
}
do_build() {
  "$PY" -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)'
  "$PY" -m pip install --no-build-isolation --no-deps -v -e . || return 1
  "$PY" -c 'import lora_kernels._C, lora_kernels._ext as e; print("extension:", e.get() is not None, e.origin())'
}
do_env() { "$PY" -m lora_kernels env && "$PY" -m lora_kernels env --json; }
do_pytest() {
  # Triton's JIT compiles dominate this step (hundreds of kernel variants); the shapes are small, so the test
  # files are sharded round-robin over PYTEST_JOBS processes sharing the GPU, each with its own log and junit
  # file (logs/pytest-<i>.*), merged into $OUT/junit.xml. The step fails if any shard fails.
  local jobs=${PYTEST_JOBS:-6} i rc=0
  local -a files shards pids
  mapfile -t files < <(ls tests/test_*.py)
  for i in "${!files[@]}"; do shards[$(( i % jobs ))]+="${files[$i]} "; done
  for i in "${!shards[@]}"; do
    # shellcheck disable=SC2086
    "$PY" -m pytest -m cuda -q -p no:cacheprovider --junitxml="$LOGS/pytest-$i.xml" ${shards[$i]} \
      > "$LOGS/pytest-$i.log" 2>&1 &
    pids[$i]=$!
  done
  for i in "${!pids[@]}"; do
    wait "${pids[$i]}"
    local r=$?
    # exit 5 = no tests collected in this shard: not a failure
    if [ $r -ne 0 ] && [ $r -ne 5 ]; then rc=1; fi
    tail -n 15 "$LOGS/pytest-$i.log"
  done
  "$PY" - "$OUT/junit.xml" "$LOGS"/pytest-*.xml <<'PYEOF'
import sys, xml.etree.ElementTree as ET
root = ET.Element("testsuites")
for f in sys.argv[2:]:
    try:
        t = ET.parse(f).getroot()
    except Exception as e:  # a shard killed by its cap leaves no file
        print("junit merge:", f, e)
        continue
    root.extend(t.findall("testsuite") if t.tag == "testsuites" else [t])
ET.ElementTree(root).write(sys.argv[1])
PYEOF
  return $rc
}
do_sanitize() { "$PY" bench/sanitize_ops.py; }
# The decode kernel (lora_kernels_C::sgmv_decode_) and the fused LoRA linear (lora_kernels_C::fused_lora_linear_)
# under a sanitizer tool: their cuda tests open the dispatch gates themselves, so they run the compiled kernels
# whether or not this GPU's table verified them yet.
# $1: the tool, $2: the pytest -k filter.
sanitize_decode() {
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$(sanitizer)" --tool "$1" --error-exitcode 1 --print-limit 50 \
    "$PY" -m pytest -m cuda -q -p no:cacheprovider tests/test_cuda.py -k "$2"
}
do_memcheck() {
  local rc=0
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$(sanitizer)" --tool memcheck --error-exitcode 1 --print-limit 50 \
    "$PY" bench/sanitize_ops.py || rc=1
  sanitize_decode memcheck "decode_kernel or fused_kernel" || rc=1
  return $rc
}
do_racecheck() {
  local rc=0
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$(sanitizer)" --tool racecheck --error-exitcode 1 --print-limit 50 \
    "$PY" bench/sanitize_ops.py || rc=1
  sanitize_decode racecheck "(decode_kernel_matches or fused_kernel_matches) and bf16" || rc=1
  return $rc
}
do_synccheck() { sanitize_decode synccheck "(decode_kernel_matches or fused_kernel_matches) and bf16"; }
do_sgmv() { bench_kept sgmv "$OUT/sgmv.json" --no-progress --time-budget "$(time_budget 40)"; }
do_merge() { bench_kept merge "$OUT/merge.json" --no-progress --time-budget "$(time_budget 30)"; }
do_linear() {  # issue 15: decode sweep of a LoRA'd linear (linear.json inside logs.tar.gz: the 8-file limit)
  bench_kept linear "$LOGS/linear.json" --no-progress --time-budget "$(time_budget 30)"
}
do_backward() {
  "$PY" -m lora_kernels backward --out "$LOGS/backward.json" --no-progress \
    --time-budget "$(time_budget 20)"
}
do_tune() {
  local rc
  "$PY" -m lora_kernels tune --out "$OUT/tune.json" --no-progress --max-configs "${TUNE_MAX_CONFIGS:-8}" \
    --time-budget "$(time_budget 30)"
  rc=$?
  local table
  table=$("$PY" -c 'import torch; from lora_kernels import tuning; print(tuning.table_path(torch.cuda.get_device_name()))' 2>/dev/null)
  if [ -n "$table" ] && [ -f "$table" ]; then cp "$table" "$OUT/tuning-$(basename "$table")"; fi
  return $rc
}
do_dual() {  # Dual-LoRA: r = 32 on 4096 -> 4096, fwd and fwd+bwd vs PyTorch and torch.compile (dual.json)
  bench_kept dual "$LOGS/dual.json" --no-progress  # returned inside logs.tar.gz (8-file limit)
}
export -f do_dual
do_serve() {  # issue 7: patched model vs PEFT mixed batch, eager and CUDA graphs (serve.json)
  bench_kept serve "$LOGS/serve.json" --time-budget "$(time_budget 40)"
}
export -f do_serve
do_vce() {  # issue 6: deform_pool fwd and fwd+bwd at the VCE shapes vs grid_sample, torch.compile, DETR fp32 (vce.json)
  # (and the fused deform_sample vs the module-style unfused step: rows lk-sample-* / lk-unfused-*)
  bench_kept vce "$LOGS/vce.json" --no-progress --reps 30 --time-budget "$(time_budget 40)"  # inside logs.tar.gz
}
export -f do_vce
do_pool() {  # issue 7: AdapterPool hit rate and prefetch stalls on the GPU (bf16, checked vs a dense reference)
  "$PY" python/many_adapters.py --adapters 1000 --capacity 64 --steps 200 --hidden 128 --layers 2 --check-every 50
}
export -f do_pool
do_overhead() {  # host overhead per op call (BENCHMARKS.md: <= 10 us); returned inside logs.tar.gz
  "$PY" -m lora_kernels overhead --iters 1000 --repeats 5 --out "$LOGS/overhead.json"
}
export -f do_overhead
do_engines() {
  "$PY" -m pytest -q -p no:cacheprovider -rs tests/test_vllm_plugin.py tests/test_sglang_plugin.py
}
export -f do_engines
export -f sanitizer sanitize_decode time_budget keep_result bench_kept do_nvidia_smi do_build do_env do_pytest do_sanitize do_memcheck do_racecheck do_synccheck do_sgmv do_linear do_merge do_backward do_tune

run_step() {
  local name=$1 fn=$2
  if [[ " $STEPS " != *" $name "* ]]; then
    SUMMARY+=("$(printf '%-11s %-8s %5s  %s' "$name" "skipped" "-" "not in GPU_CHECK_STEPS")")
    return
  fi
  local var="CAP_${name//-/_}"
  local cap=${!var:-${CAP[$name]}}
  local left=$(( BUDGET - RESERVE - ($(date +%s) - START) ))
  local limit=$(( cap < left ? cap : left ))
  if (( limit < 5 )); then
    SUMMARY+=("$(printf '%-11s %-8s %5s  %s' "$name" "SKIPPED" "-" "budget of ${BUDGET}s spent")")
    FAILED+=("$name")
    return
  fi
  echo "== $name (limit ${limit}s, $(( $(date +%s) - START ))s elapsed)"
  local t0
  t0=$(date +%s)
  STEP_LIMIT=$limit timeout -k 5 "$limit" bash -c "$fn" >"$LOGS/$name.log" 2>&1
  local rc=$?
  local dt=$(( $(date +%s) - t0 ))
  local status="ok"
  if (( rc == 124 || rc == 137 )); then status="TIMEOUT"; elif (( rc != 0 )); then status="FAIL($rc)"; fi
  [ "$status" != ok ] && FAILED+=("$name")
  SUMMARY+=("$(printf '%-11s %-8s %4ss  %s' "$name" "$status" "$dt" "logs/$name.log")")
  echo "   $status in ${dt}s"
}

echo "gpu_check: $(date -u +%FT%TZ) budget ${BUDGET}s, steps: $STEPS, OUT=$OUT"
run_step nvidia-smi do_nvidia_smi
run_step build do_build
run_step env do_env
run_step pytest do_pytest
run_step sanitize do_sanitize
run_step memcheck do_memcheck
run_step racecheck do_racecheck
run_step synccheck do_synccheck
run_step sgmv do_sgmv
run_step linear do_linear
run_step overhead do_overhead  # short; early so a spent budget never skips it
run_step merge do_merge
run_step backward do_backward
run_step tune do_tune
run_step dual do_dual
run_step serve do_serve
run_step pool do_pool
run_step vce do_vce
run_step engines do_engines

# ---- report --------------------------------------------------------------------------------------------------
print_table() {  # print_table NAME FILE NOTE: the rows of lora-bench NAME's JSON FILE as its own table, if FILE exists
  [ -f "$2" ] || return 0
  echo "---- lora-bench $1 ($3)"
  "$PY" - "$1" "$2" <<'EOF' 2>/dev/null
import importlib, json, sys
format_table = importlib.import_module("lora_kernels.bench." + sys.argv[1]).format_table
d = json.load(open(sys.argv[2]))
print(format_table(d["rows"]))
EOF
}
{
  echo "gpu_check summary ($(date -u +%FT%TZ), $(( $(date +%s) - START ))s of ${BUDGET}s, commit ${LORA_KERNELS_COMMIT:-unknown})"
  head -n 1 "$LOGS/env.log" 2>/dev/null
  grep -m1 '^GPU:' "$LOGS/env.log" 2>/dev/null
  grep -E '^(ok|FAIL)|checks passed' "$LOGS/sanitize.log" 2>/dev/null | grep -v '^ok' | tail -n 20
  grep -E 'ERROR SUMMARY|RACECHECK SUMMARY|========= (Invalid|Race|Error)' "$LOGS/memcheck.log" "$LOGS/racecheck.log" 2>/dev/null | head -n 20
  grep -E '^[0-9]+ (passed|failed)|passed|failed' "$LOGS/pytest.log" 2>/dev/null | tail -n 3
  grep -E 'hit rate|^(OK|FAILED):' "$LOGS/pool.log" 2>/dev/null
  printf '%-11s %-8s %5s  %s\n' step status time log
  printf '%s\n' "${SUMMARY[@]}"
  for f in "${FAILED[@]}"; do
    if [ -f "$LOGS/$f.log" ]; then
      echo "---- last lines of logs/$f.log"
      tail -n 25 "$LOGS/$f.log"
    fi
  done
} >"$OUT/summary.txt" 2>&1

print_table backward "$LOGS/backward.json" "full rows: logs/backward.json in logs.tar.gz"
print_table linear "$LOGS/linear.json" "issue 15's decode table; full rows: logs/linear.json in logs.tar.gz"
tar -C "$OUT" -czf "$OUT/logs.tar.gz" logs && rm -rf "$LOGS"

print_table sgmv "$OUT/sgmv.json" "full rows: sgmv.json"
print_table merge "$OUT/merge.json" "full rows: merge.json"
cat "$OUT/summary.txt"
(( ${#FAILED[@]} == 0 ))
