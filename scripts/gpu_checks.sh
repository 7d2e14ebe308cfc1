#!/usr/bin/env bash
# The GPU machine's part of issue #14, in the pieces one device call can hold (10 minutes each). From the repo
# root there, with .gpu carried (scripts/gpu_bundle.sh builds it here):
#   bash scripts/gpu_checks.sh transfer   # NIXL VRAM->VRAM between two processes vs the CUDA IPC copy; fp8 wire kernels
#   bash scripts/gpu_checks.sh cluster    # the cluster on one GPU: tests/gpu/test_cluster_gpu.py
#   bash scripts/gpu_checks.sh bench      # pdserve bench: disaggregated vs colocated at concurrency 1, 8, 32
#   bash scripts/gpu_checks.sh benchhigh  # colocated at 64, 128, 256 streams (128-token prompts, 512 tokens out)
#   bash scripts/gpu_checks.sh benchsync  # the same, colocated only, synchronous engine steps (no overlap scheduling)
#   bash scripts/gpu_checks.sh benchbase  # the bench on an earlier commit's files (scripts/gpu_baseline.sh REV wrote them
#                                         # to .gpu/baseline), rows tagged -base; this tree's files are put back after
#   bash scripts/gpu_checks.sh profile    # pdserve profile: the planner's measured profile of this GPU
#   bash scripts/gpu_checks.sh unit       # GPU tests that need no model fixture (fp8 wire kernels, sampler)
#   bash scripts/gpu_checks.sh engine     # one engine's decode step vs its graph replay, split into host/device phases (#17);
#                                         # PEER=1 adds transformers' compiled generate on the same weights (the tokens/s ratio)
# On nvidia-h200-x2 (issue #19):
#   bash scripts/gpu_checks.sh x2transfer          # NIXL GPU0 -> GPU1 vs the peer-to-peer copy; both GPUs visible, and isolated as under Ray
#   bash scripts/gpu_checks.sh x2bench2k x2bench8k # prefill on GPU 0 + decode on GPU 1 vs two colocated engines, concurrency 1-64
# Several parts in one call: bash scripts/gpu_checks.sh transfer cluster. PART_TIMEOUT=name=seconds,...
# bounds parts (a hung part then costs its bound, not the call). The device returns at most 8 files from
# $OUT, so results are written to a scratch folder and packed into $OUT/gpu_results.tgz (plus the log), also
# when a part fails or times out. Without $OUT (by hand) they stay in .out/gpu.
set -uo pipefail
cd "$(dirname "$0")/.."
restore_tree() {  # this tree's files back where benchbase laid an earlier commit's over them
  local keep=/tmp/pdserve-current f
  [ -f "$keep/FILES" ] || return 0
  while read -r f; do cp "$keep/$f" "$f"; done < "$keep/FILES"
  rm -f "$keep/FILES"
}
if [ "${1:-}" != --part ]; then   # the driver: install once, run each part in a child bounded by its timeout
  DEST=${OUT:-}
  export OUT=${DEST:+/tmp/gpu_results}
  export OUT=${OUT:-.out/gpu}
  # a warm machine keeps /tmp between calls: an earlier call's step logs would be packed with this one's
  [ -z "$DEST" ] || rm -rf "$OUT"
  mkdir -p "$OUT"
  source scripts/gpu_install.sh || exit 1
  export PDSERVE_GPU_INSTALLED=1 PYTHONUNBUFFERED=1
  status=0
  for part in "$@"; do
    limit=$(tr ',' '\n' <<<"${PART_TIMEOUT:-}" | sed -n "s/^$part=//p")
    echo "== $part ($(date -u +%T)${limit:+, at most $limit s})"
    timeout -k 10 "${limit:-100000}" bash "$0" --part "$part"
    rc=$?
    [ "$rc" -eq 0 ] || { echo "== $part: exit $rc$([ "$rc" -ne 124 ] || echo ' (timed out)')"; status=1; }
    # a part cut short can leave a Ray cluster behind (its daemons start sessions of their own)
    [ "$rc" -ne 124 ] && [ "$rc" -ne 137 ] || pkill -9 -f 'raylet|gcs_server|ray::|pdserve' 2>/dev/null
    restore_tree  # a benchbase cut short leaves the earlier commit's files in place
  done
  nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
  [ -z "$DEST" ] || tar -czf "$DEST/gpu_results.tgz" -C "$OUT" .
  exit $status
fi
[ -n "${PDSERVE_GPU_INSTALLED:-}" ] || { source scripts/gpu_install.sh || exit 1; }
MODEL=$PWD/.gpu/models/llama-3-8b
status=0

part_transfer() {
  # UCX settings are read once per process: one bench process per setting
  python3 -P benchmarks/bench_kv_transfer_ipc.py --tokens 16,256,2048,8192 --wire bf16,fp8 \
    --placement scattered,adjacent > "$OUT/transfer.jsonl" || status=1
  python3 -P benchmarks/bench_kv_transfer_ipc.py --tokens 2048,8192 --wire bf16 --placement scattered \
    --nixl-params num_threads=4,split_batch_size=16 > "$OUT/transfer_threads.jsonl" || status=1
  UCX_CUDA_IPC_ENABLE_GET_ZCOPY=auto python3 -P benchmarks/bench_kv_transfer_ipc.py --tokens 2048 --wire bf16 \
    --placement adjacent --repeat 3 > "$OUT/transfer_ucx_default.jsonl" || status=1
  PDSERVE_TEST_SEED=random python3 -P -m pytest -q -m gpu tests/gpu/test_kv_wire_kernels.py tests/gpu/test_sampler_gpu.py \
    tests/unit/test_kv_transfer.py 2>&1 | tail -5 | tee "$OUT/kv_wire_tests.txt"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
  [ ! -f benchmarks/bench_kv_wire.py ] || python3 -P benchmarks/bench_kv_wire.py --json "$OUT/kv_wire.json" > "$OUT/kv_wire.txt" || status=1
}

part_unit() {  # the GPU tests that need no model fixture, with their failures in full
  PDSERVE_TEST_SEED=random python3 -P -m pytest -q -rf -m gpu tests/gpu/test_kv_wire_kernels.py \
    tests/gpu/test_sampler_gpu.py > "$OUT/unit_tests.txt" 2>&1 || status=1
  tail -5 "$OUT/unit_tests.txt"
}

part_engine() {  # where an engine decode step's time goes beyond its graph replay (issue #17), plus a profiler trace
  python3 -P benchmarks/bench_engine_gpu.py --tokenizer "$MODEL" --out "$OUT/engine" --plans '' --overlap off,on \
    --only-graphs --breakdown --trace "${TRACE:-32}" ${PEER:+--peer} > "$OUT/engine.txt" 2>&1 || status=1
  grep -E '^\{"(batch|peer)"' "$OUT/engine.txt"
}

part_firstpull() {  # a fresh agent's first pulls (fp8 first: its kernels' JIT) and the 2K-token pull, adjacent blocks
  python3 -P benchmarks/bench_kv_transfer_ipc.py --tokens 16,2048 --wire fp8,bf16 --placement adjacent --repeat 5 \
    > "$OUT/transfer_firstpull.jsonl" || status=1
}

part_cluster() {
  PDSERVE_GPU_MODEL=$MODEL python3 -P -m pytest -q -s -m gpu tests/gpu/test_cluster_gpu.py 2>&1 |
    tail -30 | tee "$OUT/cluster_tests.txt"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
}

part_bench() {
  python3 -P benchmarks/bench_cluster_gpu.py --model "$MODEL" --deployments "${DEPLOYMENTS:-disagg-fp8,colocated}" \
    --concurrency "${CONC:-1,8,32}" --input-len "${INPUT:-2048}" --max-tokens "${MAXTOK:-64}" --requests-per-stream "${REQS:-4}" \
    --out "$OUT/cluster_bench${TAG:-}.json" --save-requests "$OUT/requests${TAG:-}" --step-log "$OUT/steps${TAG:-}" \
    ${NO_OVERLAP:+--no-overlap} ${KV_GB:+--kv-gb "$KV_GB"} --max-num-seqs "${MAX_SEQS:-64}" \
    ${PYSPY:+--pyspy "$OUT/pyspy${TAG:-}"} || status=1
}

part_benchhigh() {  # 64-256 streams on one worker, short prompts, long answers: does the serving path deliver
  # what the engine makes at the decode batches the planner's chat/short plans assume? Rows say where CPU went;
  # PYSPY=1 adds py-spy samples of the router and the worker (its wheel: .gpu/tools, scripts/gpu_bundle.sh)
  if [ -n "${PYSPY:-}" ] && ! command -v py-spy >/dev/null; then
    python3 -m pip install -q --no-deps --target /tmp/pyspy .gpu/tools/py_spy-*.whl && export PATH=/tmp/pyspy/bin:$PATH
  fi
  DEPLOYMENTS=${DEPLOYMENTS:-colocated} CONC=${CONC:-64,128,256} INPUT=${INPUT:-128} MAXTOK=${MAXTOK:-512} \
    REQS=${REQS:-2} KV_GB=${KV_GB:-24} MAX_SEQS=${MAX_SEQS:-256} TAG=${TAG:--high} part_bench
}

part_benchsync() {  # the colocated engine with synchronous steps (engine.overlap_schedule false), for the planner's validation
  DEPLOYMENTS=colocated NO_OVERLAP=1 TAG=-sync part_bench
}

part_benchbase() {
  [ -f .gpu/baseline/REV ] || { echo "benchbase: no .gpu/baseline (scripts/gpu_baseline.sh REV)"; status=1; return; }
  local keep=/tmp/pdserve-current f
  rm -rf "$keep" && mkdir -p "$keep"
  (cd .gpu/baseline && find . -name '*.py') > "$keep/FILES"
  while read -r f; do mkdir -p "$keep/$(dirname "$f")"; cp "$f" "$keep/$f"; cp ".gpu/baseline/$f" "$f"; done < "$keep/FILES"
  echo "benchbase: $(wc -l < "$keep/FILES") files of $(cut -c1-10 .gpu/baseline/REV)"
  TAG=${BASE_TAG:--base} "part_${BASE_PART:-bench}"  # BASE_PART=benchhigh BASE_TAG=-high-base: that part's rows
  restore_tree
}


part_profile() {  # the planner's profile of this GPU (issue #18), Llama-3-8B shapes, decode to batch 256
  # batch 256 at the longer context must fit the KV pool: 1,024/2,048 tokens in 80 GiB on a GPU of >= 120 GiB
  # (H200), 512/1,024 in 44 GiB on an 80 GB one (H100); the context slope comes from the two
  local mib name ctx=512,1024 kv=44
  mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
  [ "${mib:-0}" -lt $((120 * 1024)) ] || { ctx=1024,2048; kv=80; }
  name=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | grep -o 'H[0-9]*' | head -1 | tr H h)
  python3 -P -m pdserve profile --model "$MODEL" --load-format dummy --precisions bf16,fp8 --distinct-prompts \
    --prefill-tokens 128,512,2048,4096,8000 --batches "${BATCHES:-1,8,32,64,128,256}" --contexts "${CONTEXTS:-$ctx}" \
    --transfer-tokens 16,256,2048,8192 --kv-cache-memory-gb "${PROFILE_KV_GB:-$kv}" \
    --repeats "${REPEATS:-3}" --out "$OUT/${name:-gpu}-llama3-8b.json" || status=1
}

part_x2transfer() {
  for visible in all isolated; do
    python3 -P benchmarks/bench_kv_transfer_ipc.py --devices 0,1 --visible $visible --tokens 256,2048,8192 \
      --wire bf16,fp8 --placement adjacent,scattered > "$OUT/x2_transfer_$visible.jsonl" || status=1
  done
}

x2bench() {  # $1: prompt tokens
  python3 -P benchmarks/bench_cluster_gpu.py --model "$MODEL" \
    --deployments "${DEPLOYMENTS:-disagg-fp8-2gpu,colocated-2gpu}" --concurrency 1,8,32,64 --input-len "$1" \
    --max-tokens 128 --requests-per-stream 2 --goodput-ttft "${GOODPUT_TTFT:-2.0}" --goodput-tpot "${GOODPUT_TPOT:-0.05}" \
    --out "$OUT/x2_bench_$1.json" --save-requests "$OUT/requests" || status=1
}
part_x2bench2k() { x2bench 2048; }
part_x2bench8k() { x2bench 8192; }

"part_$2"
exit $status
