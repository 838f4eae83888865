#!/usr/bin/env bash
# The GPU acceptance run (issue #19): correctness on CUDA, then the kernel, encoder, chunk-memory
# and pipeline benchmarks, each beside its reference, into benchmarks/results/*.json + plots.
#
#   bash benchmarks/gpu_acceptance.sh [STEP...]          # on the device machine (default: every step)
#   bash benchmarks/gpu_acceptance.sh --smoke [STEP...]  # CPU check of this script (tests/test_benchmarks.py)
#
# Steps, after the environment record: correctness kernels aot encoder_ours encoder_official
# encoder_compiled chunk_memory pipeline actor (the default: two device calls of a 15-minute lease,
# e.g. "correctness kernels aot encoder_ours" then the rest), and encoder_small (WF-VAE-S),
# encoder_diffusers (CogVideoX, Wan) when time is left. aot prints registers, spills and shared
# memory of every kernel variant (python -m kernels.aot) beside the kernels step's measured times;
# encoder_compiled times LatentEncoder(compile=True) and (cuda_graphs=True) beside eager in the same run. The limits are estimates made
# without a GPU. A failed or timed-out step does not stop the next; acceptance_<device>.json records
# each step's status and seconds. The device machine has no network: prepare here and carry .whl and
# .official:
#   ../shared/tools/device-bundle.sh                           # the wheels it lacks -> .whl/
#   (+ diffusers and what it needs that the machine lacks, as wheels in .whl/, for the official code)
#   git clone -q https://github.com/PKU-YuanGroup/WF-VAE .official/WF-VAE; echo /.official/ >> .git/info/exclude
# Where $OUT is set (the device tool), the results are also packed into $OUT/acceptance.tgz.
set -uo pipefail
cd "$(dirname "$0")/.."
smoke=0
if [ "${1:-}" = "--smoke" ]; then smoke=1; shift; fi
steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(correctness kernels aot encoder_ours encoder_official encoder_compiled chunk_memory
                                 pipeline actor text)
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -d .whl ] && [ $smoke = 0 ]; then  # the device machine: install what it lacks
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
  for f in .whl/*.tar.xz; do [ -e "$f" ] && tar -xJf "$f" -C /tmp/site; done
  export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
export PY=${PYTHON:-python3} smoke
if [ $smoke = 1 ]; then  # the CPU check writes beside the committed results, never over them
  export device=cpu WFVAE_BENCH_RESULTS=${WFVAE_BENCH_RESULTS:-$(mktemp -d)}
else
  export device=cuda
fi
export results=${WFVAE_BENCH_RESULTS:-benchmarks/results}
mkdir -p "$results"
record="$results/acceptance_$device.json"
echo "{}" > "$record"

environment() {
  "$PY" -c "import json; from benchmarks.common import environment; print(json.dumps(environment('$device')))" \
    | tee "$results/environment_$device.json"
}

correctness() {  # on CUDA the conftest leaves TRITON_INTERPRET unset: the layout tests compile real kernels
  if [ "$smoke" = 1 ]; then
    "$PY" -m pytest -q -p no:cacheprovider tests/test_kernels.py -k "layer_norm_layouts and ncthw"
    return
  fi
  "$PY" -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_gpu_path.py tests/test_api.py \
    tests/test_engine.py || return 1
  command -v compute-sanitizer >/dev/null || { echo "compute-sanitizer not found: memcheck not run"; return 2; }
  compute-sanitizer --tool memcheck --error-exitcode 3 "$PY" -m pytest -q -p no:cacheprovider tests/test_kernels.py
}

kernels() {
  if [ "$smoke" = 1 ]; then
    "$PY" -m benchmarks.bench_kernels --device cpu --dtype fp32 --frames 5 --size 16 --channels 8 --warmup 1 --repeats 2
  else
    "$PY" -m benchmarks.bench_kernels --device cuda --dtype bf16
  fi
}

encoder() {  # name impls models dtypes shapes batches: a file each, so a timed-out step loses only its own
  local official=()
  [ -d .official/WF-VAE ] && official=(--official-repo .official/WF-VAE)
  if [ "$smoke" = 1 ]; then  # (the smoke mode measures ours only, on a tiny model)
    "$PY" -m benchmarks.bench_encoder --smoke --device cpu --impls $2 --out "$results/encoder_$1_cpu.json"
  else
    "$PY" -m benchmarks.bench_encoder --device cuda --impls $2 --models $3 --dtypes $4 --shapes $5 --batches $6 \
      --warmup 2 --repeats 5 "${official[@]}" --out "$results/encoder_$1_cuda.json"
  fi
}
encoder_compiled() { encoder compiled "ours ours_compiled ours_graphed" $L bfloat16 "33x256x256 33x512x512" "1 4 8"; }
L=wfvae-l-16chn S=wfvae-s-8chn

aot() {  # no device needed: the smoke run only checks that it starts (tests/test_kernels_aot.py runs it)
  if [ "$smoke" = 1 ]; then
    env -u TRITON_INTERPRET "$PY" -m kernels.aot --help >/dev/null
  else
    env -u TRITON_INTERPRET "$PY" -m kernels.aot --arch sm_90 --json "$results/aot_sm90.json" | tee "$results/aot_sm90.txt"
  fi
}
encoder_ours() { encoder ours ours $L "bfloat16 float32" "33x256x256 33x512x512 65x512x512 33x720x1280" "1 8"; }
encoder_official() { encoder official official $L bfloat16 "33x256x256 33x512x512 65x512x512" "1 8"; }
encoder_small() { encoder small "ours official" $S bfloat16 "33x256x256 33x512x512" "1 8"; }
encoder_diffusers() { encoder diffusers "cogvideox wan" $L bfloat16 "33x256x256 33x512x512" 1; }

chunk_memory() {
  if [ "$smoke" = 1 ]; then
    "$PY" -m benchmarks.bench_chunk_memory --size 16 --lengths 9,17 --whole-up-to 9
  else
    "$PY" -m benchmarks.bench_chunk_memory --device cuda --preset wfvae-l-16chn --size 256 --lengths 33,65,129 \
      --whole-up-to 65
  fi
}

pipeline() {
  if [ "$smoke" = 1 ]; then
    "$PY" -m benchmarks.bench_pipeline --smoke --shards 1 --videos 2 --video-frames 20 --num-frames 9 --size 32x32
  else
    "$PY" -m benchmarks.bench_pipeline --num-gpus 1 --preset wfvae-l-16chn --precision bf16 --size 512x512 \
      --num-frames 33 --batch-size 8 --shards 2 --videos 32 --video-frames 66 --video-size 540x960
  fi
}

actor() {  # the encoder actor's unit pipeline: host ms per clip on the critical path, model-busy fraction
  if [ "$smoke" = 1 ]; then
    "$PY" -m benchmarks.bench_actor --sizes 9x32x32 --units 2 --clips-per-unit 8 --out "$results/actor_cpu.json"
  else
    "$PY" -m benchmarks.bench_actor --device cuda --units 6 --out "$results/actor_cuda.json"
  fi
}

text() {  # the text-embedding path beside a plain transformers loop; the mT5-XXL FLOP estimate
  if [ "$smoke" = 1 ]; then
    "$PY" -m benchmarks.bench_text --captions 16 --unit 8 --d-model 16 --layers 2 --repeats 1
  else
    "$PY" -m benchmarks.bench_text --device cuda --captions 2048 --unit 64 --d-model 1024 --layers 8
  fi
}

run_step() {  # a step under its own time limit; its status and seconds go to the record
  local name=$1 limit=$2 start=$SECONDS status
  echo "== $name (limit ${limit}s)"
  timeout --kill-after=10 "$limit" bash -c "$name"
  status=$?
  "$PY" -c "import json, sys; path, name, status, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
record = json.load(open(path))
record[name] = {'status': 'ok' if status == 0 else 'timed out' if status in (124, 137) else f'exit {status}',
                'seconds': int(seconds)}
json.dump(record, open(path, 'w'), indent=1)" "$record" "$name" "$status" $((SECONDS - start))
}

declare -A limit=([environment]=30 [correctness]=120 [kernels]=60 [aot]=60 [encoder_ours]=180 [encoder_official]=120
                  [encoder_compiled]=150 [encoder_small]=90 [encoder_diffusers]=120 [chunk_memory]=60 [pipeline]=150
                  [actor]=120 [text]=120)
export L S
export -f environment correctness kernels aot encoder encoder_ours encoder_official encoder_compiled encoder_small \
  encoder_diffusers chunk_memory pipeline actor text
for step in environment "${steps[@]}"; do
  [ -n "${limit[$step]:-}" ] || { echo "unknown step '$step' (one of: ${!limit[*]})"; exit 2; }
  run_step "$step" "${limit[$step]}"
done
cat "$record"
if [ -n "${OUT:-}" ]; then tar -czf "$OUT/acceptance.tgz" -C "$results" .; fi
"$PY" -c "import json, sys; sys.exit(any(v['status'] != 'ok' for v in json.load(open(sys.argv[1])).values()))" "$record"
