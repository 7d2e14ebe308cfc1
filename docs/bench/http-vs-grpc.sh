#!/bin/bash
# HTTP vs gRPC bench on the CPU cluster, one server, same run (BENCHMARKS.md, issue 16); run from the
# repository root; the reports land in a scratch folder, printed at the end
PD=$PWD/.venv/bin/pdserve
cd "$(mktemp -d)"
cat > cfg.yaml <<'Y'
model: {dtype: float32}
engine: {kv_cache_memory_gb: 0.5, max_num_batched_tokens: 512}
prefill: {replicas: 1, num_cpus: 0.5}
decode: {replicas: 1, num_cpus: 0.5}
router: {host: 127.0.0.1, port: 50611, http_port: 50612, metrics_port: 50613}
Y
setsid $PD serve --config cfg.yaml > serve.log 2>&1 &
echo $! > serve.pid
for i in $(seq 1 240); do grep -q "pdserve: ready" serve.log && break; sleep 1; done
grep "pdserve: ready" serve.log || { echo "no server"; exit 1; }
COMMON="--num-requests 32 --input-len 128 --max-tokens 32 --warmup 4 --json --no-progress"
for c in 1 8 32; do
  for door in grpc http; do
    if [ $door = grpc ]; then T="--server 127.0.0.1:50611"; else T="--http http://127.0.0.1:50612"; fi
    seed=$(( c * 10 + $([ $door = grpc ] && echo 1 || echo 2) ))  # grpc and http draw different prompts (no cache hits across runs), same lengths
    $PD bench $T $COMMON --seed $seed --concurrency $c > $door-$c.json 2> $door-$c.err
    echo "$door $c rc=$?"
  done
done
kill -TERM -$(cat serve.pid); sleep 10; kill -KILL -$(cat serve.pid) 2>/dev/null
echo "done: $PWD"
