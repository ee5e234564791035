#!/usr/bin/env bash
# One device session's measurements, run in order of importance as one background pipeline.
#
# Why a pipeline: a device call may run 10 minutes, but a process that starts its own session (setsid) runs on
# until the machine goes back, so one pipeline can use the whole device budget without the gaps (and the
# per-call limit) of one call per measurement. Each later call only waits and copies .devcache/pipe to $OUT.
#
# Start (first call, after installing the wheels into /tmp/site):
#   setsid nohup bash benchmarks/device_pipeline.sh DEADLINE_EPOCH_S [STAGES] > /dev/null 2>&1 < /dev/null &
# STAGES: a comma-separated list of the stages below, run in the order given (default: the order below). Each
# stage's time limit is its own or what is left before DEADLINE_EPOCH_S, whichever is less.
# Watch (later calls): bash benchmarks/device_pipeline.sh --wait [SECONDS, default 540]
# Stop it (and the stage running): bash benchmarks/device_pipeline.sh --stop; copy .devcache/pipe away before
# starting another, which empties it.
#
# Stages: save the random full-size models; the GPU tests; `imagesmith serve` (reduce-overhead, batch_max 8)
# cold then warm; (only when named) serve-other, serve-anysize, vae-routed and unet-anysize, the runs owed by
# sessions 32-33 (one pipeline for them: models,serve-cold,serve-other,vae-routed,unet-anysize,serve-anysize, then
# SERVE_OTHER_ARGS=--compile-on-request with serve-other alone); (only when named) serve-dynamic, a cold start with IMAGESMITH_COMPILE_DYNAMIC; (only when named)
# serve-regions, a cold then a warm start with IMAGESMITH_COMPILE_REGIONS; the queue at
# batch 1, 4 and 8, eager and compiled (QUEUE_BATCHES and QUEUE_ARGS in the environment change what it runs;
# QUEUE_ARGS="--ab --eager-batches none" gives the finishing and preview A/Bs); the engine's fast path (peer,
# eager, fastest exact) with what budget is left before DEADLINE_EPOCH_S, or FAST_LIMIT_S if less (FAST_PHASES,
# FAST_VARIANTS and FAST_ARGS change what it runs); (only when named) headline, the issue's tables from what the
# stages before it wrote (benchmarks/headline.py, seconds on the CPU), into headline.md.
#
# The issue's whole benchmark in one run (run 40): models,serve-cold,fast-path,queue,headline with
# FAST_PHASES=seed,peer,eager,variants FAST_VARIANTS=reduce-overhead,reduce-overhead+fp8
# FAST_ARGS=--no-prompt-cache-ab QUEUE_ARGS="--repeats 2 --eager-batches none".
# Every queue lever's A/B at 1, 4 and 8 (run 41): QUEUE_ARGS="--repeats 2 --encode-ahead-ab --encoder-graphs-ab
# --eager-batches none". Give FAST_LIMIT_S room for a cold compile (~240 s) plus each later variant (~60 s).
# fp8 at the MLPerf setting against bf16, then fp8's latency (run 46, where FAST_PHASES lacked "variants", which
# fast_path.py now refuses): models,gpu-tests,fast-path,queue,fast-path-2
# with GPU_TESTS_K=fp8 FAST_PHASES=mlperf,variants FAST_VARIANTS=reduce-overhead:mlperf,reduce-overhead+fp8:mlperf,
# reduce-overhead+fp8dyn:mlperf FAST_ARGS="--mlperf-batches 8 --compile-needs-s 180" FAST_LIMIT_S=700
# QUEUE_BATCHES=8 QUEUE_ARGS="--fp8 --repeats 2 --eager-batches none" FAST2_PHASES=eager,variants
# FAST2_VARIANTS=reduce-overhead+fp8 FAST2_ARGS="--no-prompt-cache-ab --compile-needs-s 240".
# Run 47 (the MLPerf A/B in one process and eager fp8's peak): models,fast-path,queue with
# FAST_PHASES=eager,mlperf,variants FAST_VARIANTS=off+fp8,reduce-overhead:mlperf,reduce-overhead+fp8:mlperf,
# reduce-overhead+fp8dyn:mlperf FAST_ARGS="--mlperf-batches 8 --compile-needs-s 180 --no-prompt-cache-ab"
# FAST_LIMIT_S=800; its queue stage was lost with the machine.
# Run 49 (the decode A/B and batch 16 at the MLPerf setting, the queue at 8 and 16, the ensemble's decode A/B):
# models,fast-path,queue,gpu-tests,fast-path-2 with FAST_PHASES=variants
# FAST_VARIANTS=reduce-overhead+fp8+olddecode:mlperf,reduce-overhead+fp8:mlperf FAST_ARGS="--mlperf-batches 8,16
# --compile-needs-s 180 --no-prompt-cache-ab" FAST_LIMIT_S=450 QUEUE_BATCHES=8,16 QUEUE_ARGS="--fp8 --repeats 2
# --eager-batches none --jobs 32" GPU_TESTS_K="compiled_engine_matches or cuda_graphs_warmed" FAST2_PHASES=variants
# FAST2_VARIANTS=reduce-overhead+olddecode,reduce-overhead FAST2_ARGS="--no-prompt-cache-ab --compile-needs-s 240".
# Run 49 kept only models and fast-path (the machine was released before the second call); run 50 measured the
# ensemble's decode A/B (FAST_PHASES=eager,variants FAST_VARIANTS=reduce-overhead+olddecode,reduce-overhead).
# Run 52 (fp8 convolutions): models,gpu-tests,fast-path with GPU_TESTS_K=fp8_conv FAST_PHASES=eager,mlperf,variants
# FAST_VARIANTS=reduce-overhead+fp8:mlperf,reduce-overhead+fp8+fp8conv:mlperf,... (the machine went back between
# the calls after fast-path's first variant; a +fp8conv variant's first call is ~300 s, static fp8's ~165 s).
# Plan every pipeline to fit ONE call (about 590 s): in runs 47, 49 and 52 the machine went back between a call and
# the next one chained at once, taking the pipeline with it. Split longer work into pipelines of one call each.
# Runs 53-56 (one call each): run 53 measured +fp8conv (channels-last) with its eager reference, but its NCHW peer
# did not fit the call; run 54 the GPU tests (GPU_TESTS_K="fp8_conv or convs or remembered") and
# benchmarks/fp8_attention.py; run 55 models,queue with QUEUE_BATCHES=1,4 QUEUE_ARGS="--fp8 --repeats 2
# --eager-batches none" produced no row in 497 s (a static-fp8 service start does not fit one call); run 56
# benchmarks/fp8_conv_plan_names.py.
# Runs 57-60 (session 20): run 57 GPU_TESTS_K="by_name or geglu" and benchmarks/fp8_geglu.py (plain python
# calls, no pipeline); run 58 the same; run 59 models,fast-path with FAST_PHASES=variants
# FAST_VARIANTS=reduce-overhead+fp8+fp8conv+geglu:mlperf,reduce-overhead+fp8+fp8conv:mlperf (the peer did not fit);
# run 60 the same with reduce-overhead+fp8:mlperf,reduce-overhead+fp8+geglu:mlperf (the second did not fit: a
# static-fp8 variant's first call was 223 s, and the fused one's longer).
# Runs 61-65 (session 21): run 61 fp8_geglu.py --cold and vae_decode.py (plain python calls); runs 62-63
# models,fast-path with +fp8+fp8conv+geglu:mlperf cold, then the next call on the same machine with
# +fp8+fp8conv:mlperf,+fp8+fp8conv+geglu:mlperf (the second from the first's caches: a same-process A/B in 284 s);
# run 64 models,fast-path with reduce-overhead+fp8:mlperf and --idle-profile; run 65 fast-path alone with
# +fp8conv+geglu and --pin-ab --idle-profile in 305 s did not finish its first call (no figure).
# Runs 66-68 (session 22): run 66 fast-path alone with reduce-overhead+fp8:mlperf and --pin-ab --idle-profile
# --idle-stacks (the pin's A/B: -70 ms a batch), chained within 30 s by +fp8+fp8conv+geglu:mlperf (1.994 images/s);
# run 67 benchmarks/host_threads.py, then gpu-tests,fast-path with GPU_TESTS_K=starting_noise and the same variant
# (+ --threads-ab --noise-ab --idle-profile --idle-stacks; 520 s in all, the first call 281 s cold); run 68
# fast-path with reduce-overhead:mlperf and --host-ab --idle-profile (218 s). Those flags are now --ab NAMES
# (host_peers.py: pin, noise, host, pixels, threads), peer and engine batches alternating, --ab-rounds 8 by default.
# Runs 69-72 (session 23): run 69 gpu-tests,fast-path with GPU_TESTS_K="starting_noise or host_pixels" and
# FAST_VARIANTS=reduce-overhead+fp8+fp8conv+geglu:mlperf FAST_ARGS="--mlperf-batches 8 --compile-needs-s 120
# --no-prompt-cache-ab --ab host,pixels --ab-rounds 8 --idle-profile --idle-stacks" (469 s: 2.010 images/s pooled);
# run 70 fast-path with FAST_PHASES=eager,variants FAST_VARIANTS=reduce-overhead FAST_ARGS="--no-prompt-cache-ab
# --ab pin,host --ab-rounds 8" (325 s: 1.330 s); run 71, chained, the same with
# FAST_VARIANTS=reduce-overhead+fp8+fp8conv+geglu FAST_ARGS=--no-prompt-cache-ab (509 s: 1.118 s, 38.9 dB); run 72
# benchmarks/unet_kernels.py directly (30 s).
# Session 24 had no device (loans paused); it built benchmarks/unet_compiled.py for the next session's first call.
# Next: (0) one call, no pipeline: python3 -m pytest -q -m gpu tests/gpu/test_gpu_bench.py (test_gpu_bench: never run
# on a GPU), then timeout 500 python3 benchmarks/unet_compiled.py --out $OUT/unet_compiled.json --profile (the base
# UNet at the ensemble's shape compiled four ways: ro, ro+cdt, mat, mat+cdt; predictions in docs/benchmarks.md, "Run
# 73"); (1) the service's queue at the fastest levers, on fast_path's warm engine: fast-path with FAST_PHASES=variants
# FAST_VARIANTS=reduce-overhead+fp8+fp8conv+geglu:mlperf FAST_ARGS="--mlperf-batches 8,4 --compile-needs-s 120
# --no-prompt-cache-ab --queue-jobs 32" (~360 s: 4 and 8 share the batched graph), then the same with --mlperf-batches
# 1 (the one-image graph: a cold compile of its own); (2) what (0) says: a variant that saves >= 1 ms a base call goes
# end to end (fast_path's +cdt, or max-autotune with TORCHINDUCTOR_MAX_AUTOTUNE_CONV_BACKENDS=ATEN exported); (3)
# unet_kernels.py again with the fixed classifier (30 s) for the matmul / convolution split, and vae_decode.py
# --variants compiled,compiled-math,compiled-mathbf16 --no-conv-floor (~90 s; docs/benchmarks.md's predictions); then
# the layout A/B (+fp8conv against +fp8convnchw), dynamic fp8 at MLPerf.
# Session 25 had no device either (loans paused); it built IMAGESMITH_COMPILE_REGIONS (engine/compile_regions.py) and
# kept the UNets' model sizes static (engine/batch_routing.py). Its calls go after (0), predictions in
# docs/benchmarks.md ("Session 25"): (0b) one call: timeout 560 python3 benchmarks/unet_compiled.py --variants
# ro,ro+regions --first ro+regions --fresh-cache --out $OUT/regions.json (the regions' cold compile and their price
# per call against ro in one process); (0c) one detached pipeline (start, then --wait calls): models,serve-regions (a cold and a warm start against run 36's
# 433-596 / 152 s; the models stage saves the random SDXL folder the service loads); (0d) fast-path with
# FAST_PHASES=variants FAST_VARIANTS=reduce-overhead+regions,reduce-overhead (the ensemble, regions against none).
# Runs 74-75 (late in session 25) did (0b), test_gpu_bench (passes) and ro+cdt (+0.05 ms: no gain). Next: (0) with
# --variants ro,mat --fresh-cache alone (max-autotune, the last compile-side lever; ro compiles in ~115 s), then
# (0c), (1), (3) as above.
# Session 26 got no device call through (machines not started, taken back, then none lent). Next, in order, one
# call each: run 77 (docs/benchmarks.md: the MLPerf setting through the service's queue at the fastest levers):
# python3 benchmarks/fast_path.py --out $OUT/fp --cache-dir .devcache/c --phases variants --variants
# reduce-overhead+fp8+fp8conv+geglu:mlperf --budget-s 525 --compile-needs-s 120 --mlperf-batches 8,4
# --no-prompt-cache-ab --queue-jobs 32 (carry nvidia-cudnn-frontend==1.16.0's wheel in .whl); run 76:
# unet_compiled.py --variants ro,mat --profile; run 78: unet_compiled.py --variants ro,ro+kv --profile (the
# cross-attention's keys and values projected once per prompt, benchmarks/cross_attention_kv.py); then (0c), (3).
# Session 28 ran 77 (393 s; the queue 1.983 images/s steady at batch 8), 78 (213 s; +0.07 ms, the prototype
# dropped) and 76 (566 s cut off while autotuning, then 273 s on the same machine: +3.4 ms). Next, one call: run 79,
# python3 benchmarks/fast_path.py --out $OUT/fp --cache-dir .devcache/c --phases variants --variants
# reduce-overhead+fp8+fp8conv+geglu:mlperf --budget-s 525 --compile-needs-s 120 --mlperf-batches 8 --no-prompt-cache-ab
# --queue-jobs 32 --queue-ab no-encode-ahead,finish-inline,no-previews, then python3 -m pytest -q -m gpu
# tests/gpu/test_gpu_encoder_graphs.py (predictions in docs/benchmarks.md, "Built after run 77"); then (0c), (3).
# Session 35 (run 85, one H100, three calls of 551, 541 and 30 s): models,serve-other,fast-path,vae-routed,
# unet-anysize,serve-anysize with SERVE_OTHER_ARGS="--batch-max 1 --max-images-per-request 1", FAST_PHASES=variants
# FAST_VARIANTS=reduce-overhead+fp8+fp8conv+geglu:mlperf FAST_LIMIT_S=420 FAST_ARGS="--mlperf-batches 8
# --no-prompt-cache-ab --queue-jobs 32 --queue-ab hand-over-first --cache-dir .devcache/fast/compile-cache" and a
# 1150 s deadline: all done but unet-anysize (ro+anysize still compiling after ~250 s) and serve-anysize (no time).
# Run 86: a fresh H200 with 312 s could not finish fast_path.py's cold first call (over 290 s there: the models
# built in-process, an empty cache). Owed, each its own call: the H200 queue (run 85's fast-path stage alone, ~330
# s cold); unet-anysize alone (ro 85 s + ro+anysize over 250 s + default+anysize: give it the whole call);
# serve-other with SERVE_OTHER_ARGS="--batch-max 1 --max-images-per-request 1 --compile-on-request" (187 s cold +
# 1024x960's compile on its request, 200-350 s predicted); serve-anysize (over one call cold: needs a kept cache).
# Session 36 (run 87, H100s): models,unet-anysize with UNET_ANYSIZE_LIMIT_S=760 over two chained calls (ro 132.8 s,
# ro+anysize 453.4 s and +10.3 ms a call; default+anysize cut in its compile), then serve-other with
# --compile-on-request (a 312 s cold start on that slow-compiling host; the new size's request compiles the shared
# any-size graphs, over 238 s, unfinished). Owed, each its own call: the H200 queue (as above); unet-anysize with
# --variants ro,ro+anysize+cl (channels-last weights for the any-size graph: ~600 s, two chained calls);
# default+anysize (the any-size graph without CUDA graphs); serve-anysize (over one call cold). The channels-last
# call: models,unet-anysize with UNET_ANYSIZE_VARIANTS=ro,ro+anysize+cl UNET_ANYSIZE_LIMIT_S=760 and a deadline
# ~800 s on, then --wait again at once.
# Session 37 (run 88, an H100): unet-anysize alone with UNET_ANYSIZE_VARIANTS=ro,ro+anysize+cl fit one call (497 s:
# ro 135.2 s, ro+anysize+cl 317.6 s and +8.8 ms a call), then the GPU tests in two plain pytest calls (262 s, 361
# s). Owed: the H200 queue (as above); default+anysize; serve-anysize (now with channels-last UNets, shorter).
# Session 38 (run 89, an H100): fast-path,unet-layout over two chained calls with FAST_PHASES=eager,variants
# FAST_VARIANTS=reduce-overhead,reduce-overhead+cl FAST_ARGS=--no-prompt-cache-ab FAST_LIMIT_S=700 (403 s, then
# unet-layout 388 s: channels-last weights -2.1 % an ensemble image), then unet-anysize with
# UNET_ANYSIZE_VARIANTS=ro,default+anysize+cl (321 s: +33.6 ms a call, host-bound). Run 90 (the same session,
# another H100): python3 benchmarks/unet_kernels.py --variants eager,eager-cl (plain, before the pipeline), then
# models,serve-other with IMAGESMITH_CHANNELS_LAST=true SERVE_OTHER_ARGS="--batch-max 1 --max-images-per-request 1"
# (241 s in all), then serve-other alone with IMAGESMITH_CHANNELS_LAST=false on the same machine (171 s).
# Session 39 (run 91, an H100): unet-triton,gpu-tests with GPU_TESTS_K="compiled or cuda_graphs or decoder" over
# two chained calls (375 s, then 395 s: 8 passed); then unet-memsets. Owed: the H200 queue; serve-anysize.
# Session 43 (runs 97-99, an H100): bf16-geglu,gpu-tests with GPU_TESTS_K="bf16_geglu or fused_geglu_kernel" (202 s);
# models,fast-path with FAST_PHASES=eager,variants FAST_VARIANTS=reduce-overhead+cl+mk,reduce-overhead+cl+mk+bgeglu
# FAST_ARGS=--no-prompt-cache-ab FAST_LIMIT_S=570 (472 s); gpu-tests with IMAGESMITH_TIMED_REDUCTIONS=true cut off
# at 305 s (25 passed). Owed: the whole GPU suite under timed reductions (GPU_TESTS_LIMIT_S=900), the H200 queue,
# serve-anysize.
# Session 44 (runs 100-102, an H100, after 661 s of failed starts): bf16-tiles,gpu-tests with GPU_TESTS_K=bf16_geglu
# (242 s); models,fast-path with FAST_PHASES=eager,variants FAST_VARIANTS=reduce-overhead+cl+mk+bgeglu,
# reduce-overhead+cl+mk+bgeglu+pgeglu (427 s; +pgeglu, the persistent launch, is in git at 54c74dd); gpu-tests with
# GPU_TESTS_K="not bf16_geglu" cut off at 305 s (18 passed). Owed: the other 17 GPU tests, the whole suite under
# timed reductions, the H200 queue and ensemble, serve-anysize.
set -u
PIPE=.devcache/pipe

if [ "${1:-}" = "--stop" ]; then
    # Stop the running pipeline and its stage (to run other stages next, in the same call). Not `pkill -f
    # device_pipeline.sh`: that also matches the calling command's own shell, which run 46 killed that way.
    [ -f "$PIPE/pid" ] && kill -- "-$(cat "$PIPE/pid")" 2>/dev/null
    echo "$(date +%s) stopped" >> "$PIPE/stages"
    exit 0
fi

if [ "${1:-}" = "--wait" ]; then
    # A machine released between two calls (idle 30 s: run 47's second call came late) is replaced by a fresh
    # one without the pipeline; waiting there would spend the whole call's device time on nothing (run 47: 570 s).
    if [ ! -f "$PIPE/stages" ]; then
        echo "no pipeline on this machine: it is a fresh one (the last was released, its pipeline with it)"
        exit 3
    fi
    # Wait until the pipeline ends or SECONDS pass, copying everything it wrote so far to $OUT every 30 s and at
    # the end. Why every 30 s: a call's limit can be shorter than asked (the device time left), and a call killed
    # at its limit returns only what is already under $OUT; run 39 lost its whole stage that way.
    until grep -q "^pipeline end" "$PIPE/stages" 2>/dev/null || [ "$SECONDS" -ge "${2:-540}" ]; do
        sleep 5
        [ $((SECONDS % 30)) -lt 5 ] && cp -r "$PIPE" "$OUT/" 2>/dev/null
    done
    cp -r "$PIPE" "$OUT/" 2>/dev/null
    cat "$PIPE/stages"
    exit 0
fi

DEADLINE=$1
STAGES=${2:-models,gpu-tests,serve-cold,serve-warm,queue,fast-path}
rm -rf "$PIPE"  # a warm machine keeps .devcache: an earlier run's "pipeline end" would end --wait at once
mkdir -p "$PIPE"
# Started with setsid, so this shell leads its own process group: --stop ends the group, stages included.
echo $$ > "$PIPE/pid"
left() { echo $((DEADLINE - $(date +%s) - 20)); }
stage() {
    local name=$1 limit=$2
    shift 2
    local budget
    budget=$(left)
    [ "$budget" -lt "$limit" ] && limit=$budget
    if [ "$limit" -lt 30 ]; then
        echo "$(date +%s) skip $name: ${budget}s left" >> "$PIPE/stages"
        return
    fi
    echo "$(date +%s) start $name (limit ${limit}s)" >> "$PIPE/stages"
    timeout -k 30 "$limit" "$@" > "$PIPE/$name.log" 2>&1
    local rc=$?  # before anything else runs: $(date) would reset it (124: the stage ran out of time)
    echo "$(date +%s) end $name rc=$rc" >> "$PIPE/stages"
}

# fast_path NAME LIMIT_S PHASES VARIANTS ARGS: benchmarks/fast_path.py with what budget is left, or LIMIT_S if less.
fast_path() {
    local name=$1 budget
    budget=$(left)
    [ -n "$2" ] && [ "$budget" -gt "$2" ] && budget=$2
    if [ "$budget" -gt 150 ]; then
        # shellcheck disable=SC2086  # ARGS is a list of arguments
        stage "$name" "$((budget + 15))" python3 benchmarks/fast_path.py --out "$PIPE/$name" \
            --cache-dir .devcache/serve8/compile-cache --phases "$3" --variants "$4" --budget-s "$budget" \
            --compile-needs-s 120 $5
    else
        echo "$(date +%s) skip $name: ${budget}s left" >> "$PIPE/stages"
    fi
}

# unet_layouts NAME LIMIT_S TOP: unet_compiled.py's ro against ro+cl with --profile, base UNet then refiner's,
# listing each call's TOP longest kernels.
unet_layouts() {
    stage "$1" "$2" bash -c 'for unet in base refiner; do python3 benchmarks/unet_compiled.py \
        --out "$1/$2-$unet.json" --unet "$unet" --variants ro,ro+cl --profile --profile-top "$3" || exit; done' \
        _ "$PIPE" "$1" "$3"
}

run_stage() {
    case $1 in
    models) stage models 180 python3 -c "import sys; sys.path.insert(0, 'benchmarks'); \
from pathlib import Path; from serve_start import save_random_models as s; \
print(s(Path('.devcache/random-sdxl'), False))" ;;
    # GPU_TESTS_K: a pytest -k expression, to run only the tests of what changed (all of them when unset).
    # GPU_TESTS_LIMIT_S: the whole suite with IMAGESMITH_TIMED_REDUCTIONS compiles longer than 420 s (run 95).
    gpu-tests) stage gpu-tests "${GPU_TESTS_LIMIT_S:-420}" python3 -m pytest -m gpu tests/gpu -q -p no:cacheprovider -k "${GPU_TESTS_K:-}" ;;
    serve-cold) stage serve-cold 720 python3 benchmarks/serve_start.py --out "$PIPE/serve-cold" \
        --models .devcache/random-sdxl --data .devcache/serve8 --compile reduce-overhead --batch-max 8 --starts 1 --requests 6 \
        --timeout-s 700 ;;
    serve-warm) stage serve-warm 360 python3 benchmarks/serve_start.py --out "$PIPE/serve-warm" \
        --models .devcache/random-sdxl --data .devcache/serve8 --compile reduce-overhead --batch-max 8 --starts 1 --requests 6 \
        --timeout-s 340 ;;
    # A warm start, then requests at a size the warm-up did not run (1024x960): uncompiled by default (session 33),
    # compiled on the first with --compile-on-request (SERVE_OTHER_ARGS). Predicted: 1.9-2.1 s uncompiled;
    # 200-350 s then ~1.45 s compiling on the request (docs/benchmarks.md, "Session 33").
    # shellcheck disable=SC2086  # SERVE_OTHER_ARGS is a list of arguments
    # On a fresh machine its data dir is cold: the start compiles (433-596 s in runs 36-40), hence the limit.
    # A one-image-only start (the batch-1 warm-up alone: 196 s cold on an H100, run 84) needs
    # SERVE_OTHER_ARGS="--batch-max 1 --max-images-per-request 1"; --batch-max 1 alone still warms batch 4.
    serve-other) stage serve-other 900 python3 benchmarks/serve_start.py --out "$PIPE/serve-other" \
        --models .devcache/random-sdxl --data .devcache/serve8 --compile reduce-overhead --batch-max 8 --starts 1 --requests 3 \
        --other-size 1024x960 --timeout-s 860 ${SERVE_OTHER_ARGS:-} ;;
    # A first start that also warms up the graphs every other size shares (its own compile cache): the start-up
    # cost of IMAGESMITH_WARMUP_ANY_SIZE against serve-cold (predicted +60-100 %), then 1024x960 compiled.
    serve-anysize) stage serve-anysize 900 python3 benchmarks/serve_start.py --out "$PIPE/serve-anysize" \
        --models .devcache/random-sdxl --data .devcache/serve8-anysize --compile reduce-overhead --batch-max 8 --starts 1 \
        --requests 3 --other-size 1024x960 --any-size --timeout-s 880 ;;
    # The routed decoder after another size (session 32's prediction: -sized within 0.5 ms of the static graph).
    vae-routed) stage vae-routed 300 python3 benchmarks/vae_decode.py --out "$PIPE/vae-routed.json" \
        --variants compiled-routed,compiled-routed-dynamic,compiled-routed-sized ;;
    # The base UNet's any-size graph against its static one (predicted +10-15 %; the any-size compile is long),
    # then the same without CUDA graphs (predicted 0.5-3 ms a call above ro+anysize: launches overlap the GPU's work).
    # UNET_ANYSIZE_LIMIT_S lifts its limit: run 85 cut it at ~250 s into the any-size compile. UNET_ANYSIZE_VARIANTS
    # picks the variants (ro,ro+anysize+cl: channels-last weights for the any-size graph, owed after run 87).
    unet-anysize) stage unet-anysize "${UNET_ANYSIZE_LIMIT_S:-480}" python3 benchmarks/unet_compiled.py --out "$PIPE/unet-anysize.json" \
        --variants "${UNET_ANYSIZE_VARIANTS:-ro,ro+anysize,default+anysize}" --profile ;;
    # The static graph with channels-last weights against NCHW ones (ro+cl against ro), base then refiner: NCHW
    # weights are copied into channels-last on every call (unet_compiled.py says where). UNET_LAYOUT_LIMIT_S.
    unet-layout) unet_layouts unet-layout "${UNET_LAYOUT_LIMIT_S:-600}" 10 ;;
    # The same, listing every kernel of a call (its Triton ones by what they fuse): per-call work of the weight
    # copies' kind left in the Triton time (session 39).
    unet-triton) unet_layouts unet-triton "${UNET_LAYOUT_LIMIT_S:-600}" 1000 ;;
    # Session 40: three inductor options on the base call's Triton kernels (unet_compiled.py says which and why),
    # against the engine's graph (ro+cl); then the cross-attention written out against cuDNN's (run 92).
    unet-knobs) stage unet-knobs "${UNET_KNOBS_LIMIT_S:-560}" python3 benchmarks/unet_compiled.py \
        --out "$PIPE/unet-knobs-${UNET_KNOBS_UNET:-base}.json" --unet "${UNET_KNOBS_UNET:-base}" --peer ro+cl \
        --variants "${UNET_KNOBS_VARIANTS:-ro+cl,ro+cl+ndt,ro+cl+mk,ro+cl+combo}" --profile --profile-top 1000 ;;
    cross-attention) stage cross-attention 200 python3 benchmarks/cross_attention.py --out "$PIPE/cross-attention.json" ;;
    # Which operators queue the memsets a compiled call's CUDA graph replays (~236 a base call, run 91): eager and
    # inductor's default mode (no CUDA graphs), channels-last, both UNets.
    unet-memsets) stage unet-memsets 560 python3 benchmarks/unet_kernels.py --out "$PIPE/unet-memsets.json" \
        --variants eager-cl,compiled-cl ;;
    # The same first start with the UNets compiled once, with dynamic shapes (its own, empty compile cache).
    serve-dynamic) stage serve-dynamic 720 env IMAGESMITH_COMPILE_DYNAMIC=true \
        python3 benchmarks/serve_start.py --out "$PIPE/serve-dynamic" --models .devcache/random-sdxl \
        --data .devcache/serve8-dynamic --compile reduce-overhead --batch-max 8 --starts 1 --timeout-s 700 ;;
    # A first and a second start with each kind of transformer block compiled once (its own compile cache): the
    # start-up it saves against serve-cold / serve-warm, and the one-image requests' latency after it.
    serve-regions) stage serve-regions 900 env IMAGESMITH_COMPILE_REGIONS=true \
        python3 benchmarks/serve_start.py --out "$PIPE/serve-regions" --models .devcache/random-sdxl \
        --data .devcache/serve8-regions --compile reduce-overhead --batch-max 8 --starts 2 --requests 4 --timeout-s 600 ;;
    # Compiled at batch 1, 4 and 8 (one engine; its warm-ups after the first hit dynamo's in-process graphs).
    # shellcheck disable=SC2086  # QUEUE_ARGS is a list of arguments
    queue) stage queue 720 python3 benchmarks/queue_throughput.py --out "$PIPE/queue" \
        --batches "${QUEUE_BATCHES:-1,4,8}" --jobs 16 --compiled --all-compiled --compile-mode reduce-overhead \
        --cache-dir .devcache/serve8/compile-cache ${QUEUE_ARGS:-} ;;
    # The fastest exact configuration (cudnn.benchmark is refused with CUDA graphs: it failed the capture in
    # run 27, was slower in run 31 and crashed the eager fallback in run 32); FAST_VARIANTS picks others.
    fast-path) fast_path fast-path "${FAST_LIMIT_S:-}" "${FAST_PHASES:-peer,eager,variants}" \
        "${FAST_VARIANTS:-reduce-overhead}" "${FAST_ARGS:-}" ;;
    # A second run of the fast path in the same pipeline (after the queue, say), with its own FAST2_* settings.
    fast-path-2) fast_path fast-path-2 "${FAST2_LIMIT_S:-}" "${FAST2_PHASES:-eager,variants}" \
        "${FAST2_VARIANTS:-reduce-overhead}" "${FAST2_ARGS:-}" ;;
    # Session 42: the bf16 fused GEGLU kernel against cuBLAS + inductor's GEGLU, per shape, both UNets.
    bf16-geglu) stage bf16-geglu 240 python3 benchmarks/bf16_geglu.py --out "$PIPE/bf16-geglu.json" --batches 2 ;;
    # Every tile config of the bf16 kernel alone, at each feed-forward shape (run 100).
    bf16-tiles) stage bf16-tiles 300 python3 benchmarks/bf16_geglu_tiles.py --out "$PIPE/bf16-tiles.json" ;;
    # A one-image service (the batch-1 warm-up alone), a cold start then a restart on its kept compile cache: the
    # service's start-up with the defaults of the day (timed reductions on with compile since session 46).
    # SERVE_ONE_DATA=.devcache/serve8 leaves its compile cache where fast-path reads it (session 51: the fast path
    # after it then starts warm, as a restart would).
    serve-one) stage serve-one 600 python3 benchmarks/serve_start.py --out "$PIPE/serve-one" \
        --models .devcache/random-sdxl --data "${SERVE_ONE_DATA:-.devcache/serve1}" --compile reduce-overhead --batch-max 1 \
        --max-images-per-request 1 --starts 2 --requests 3 --timeout-s 450 ;;
    # Session 47: FlashAttention-4's Hopper kernel against cuDNN's attention, every attention shape of both UNets
    # (needs flash-attn-4 and its CuTe DSL wheels in /tmp/site: benchmarks/fa4_wheels.sh).
    fa4) stage fa4 300 python3 benchmarks/attention_fa4.py --out "$PIPE/fa4.json" ;;
    headline) stage headline 60 python3 benchmarks/headline.py "$PIPE" --out "$PIPE/headline.md" ;;
    *) echo "$(date +%s) unknown stage $1" >> "$PIPE/stages" ;;
    esac
}

IFS=, read -r -a ORDER <<< "$STAGES"
for name in "${ORDER[@]}"; do
    run_stage "$name"
done
echo "pipeline end $(date +%s)" >> "$PIPE/stages"
