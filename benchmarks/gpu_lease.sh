#!/usr/bin/env bash
# One GPU lease for the accuracy work, in steps (each step is one device call; see ../shared/device/README.md for the
# bundles). Real vLLM 0.26.0 from the vLLM bundle, Qwen2.5-Coder-0.5B and -1.5B from the model bundles.
#
#   bash benchmarks/gpu_lease.sh vllm p00|p01          collect a vLLM bundle part (the last one unpacks to /tmp/site)
#   bash benchmarks/gpu_lease.sh fa4 p00|p01           collect an FA4 extras part (make_fa4_bundle.sh; unpacks to /tmp/fa4site)
#   bash benchmarks/gpu_lease.sh legacy 012|010 pNN [last]  stage a part of the lean vLLM 0.12/0.10 tree (issue 17;
#                                                      ../shared/device/legacy); `last` unpacks it to /opt/leg_vNNN
#   bash benchmarks/gpu_lease.sh part BUNDLE pNN DEST  collect a model bundle part (.model_bundle15 p03 /tmp/qwen15)
#   bash benchmarks/gpu_lease.sh convert 05|15         GGUF -> HF folder /tmp/qwenNN_hf, in the background
#   bash benchmarks/gpu_lease.sh gputests              the op's GPU tests in the background (log /tmp/gputests.log)
#   bash benchmarks/gpu_lease.sh opquality 05|15 [bg]  one model's (alpha, tau) sweep (bg: in the background)
#   bash benchmarks/gpu_lease.sh choose 05 [15]        wait for the sweeps (and e2e), copy them to $OUT, apply the rule
#   bash benchmarks/gpu_lease.sh accuracy 05|15 [TAG]  the accuracy harness at FLASHPREFILL_ALPHA / _TAU from the env
#   bash benchmarks/gpu_lease.sh e2e bg                tests/e2e ($E2E_CASES, a -k expression) on the 0.5B model
#   bash benchmarks/gpu_lease.sh queue bg              every GPU job of the lease, one after another (below)
#   bash benchmarks/gpu_lease.sh collect               copy background logs and the queue's results (q.tgz) to $OUT
#
# A device call carries the working tree too, and a model part is 59 MiB of the 64 MiB a call may carry: move
# benchmarks/results (most of the tree) out of the checkout for the model-part calls and back afterwards.
#
# The plugin's entry point is made visible to vLLM's processes by a hand-written dist-info under /tmp/fp_meta (no
# build, no install into the image).
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"

fa4_path() {   # the FA4 extras (make_fa4_bundle.sh), when collected: their .pth is not read from PYTHONPATH
    [ -e /tmp/fa4site/.bundle_sha256 ] && echo ":/tmp/fa4site:/tmp/fa4site/nvidia_cutlass_dsl/dsl_packages"
}

setup_env() {
    mkdir -p /tmp/fp_meta/flashprefill_vllm-0.0.0.dist-info
    printf 'Metadata-Version: 2.1\nName: flashprefill-vllm\nVersion: 0.0.0\n' \
        > /tmp/fp_meta/flashprefill_vllm-0.0.0.dist-info/METADATA
    printf '[vllm.general_plugins]\nflashprefill = flashprefill_vllm.plugin:register\n' \
        > /tmp/fp_meta/flashprefill_vllm-0.0.0.dist-info/entry_points.txt
    export PYTHONPATH=$1:/tmp/fp_meta:/tmp/site:/tmp/gguf_site$(fa4_path) PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
    export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
    export FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1 FLASH_ATTENTION_CUTE_DSL_CACHE_DIR=/tmp/cute_cache
}

wait_for() {   # wait_for FILE SECONDS
    for _ in $(seq "$2"); do [ -e "$1" ] && return 0; sleep 1; done
    echo "timed out waiting for $1"; return 1
}

step=${1:?step}; shift
case "$step" in
vllm)
    bash "$REPO/.vllm_bundle/$1/install_vllm_bundle.sh"; rc=$?; echo "rc=$rc"; exit $rc ;;
part)
    bash "$REPO/$1/$2/collect_parts.sh" "$3"; rc=$?; echo "rc=$rc"; exit $rc ;;
legacy)   # parts made by ../shared/device/legacy/pack.sh, one per folder .legacy_bundleNNN/pMM (with the two scripts)
    V=$1; D="$REPO/.legacy_bundle$V/$2"; mkdir -p /root/leg_stage && cp "$D"/v$V.tar.xz.part* /root/leg_stage/
    echo "staged $(ls /root/leg_stage | wc -l) part(s) of v$V"
    if [ "${3:-}" = last ]; then
        bash "$D/device_unpack.sh" "v$V" && cp "$D/smoke.py" /tmp/leg_smoke.py && cd /tmp && \
            PYTHONPATH=/opt/leg_v$V VLLM_USE_FLASHINFER_SAMPLER=0 EAGER=1 timeout 500 python3 -s /tmp/leg_smoke.py
    fi ;;
legacy_check)   # legacy_check 012|010 (after `legacy ... last` and the 0.5B model): stock vs FlashPrefill through the
                # patch loader and through the automatic loader, alpha ~0 (greedy tokens must match), issue 17
    V=$1; T=$OUT/leg$V; mkdir -p $T; setup_env "$REPO"; cd "$REPO"
    run() { local name=$1 envs=$2; shift 2; env PYTHONPATH=/opt/leg_v$V:$REPO${EXTRA_PATH:-} \
        VLLM_USE_FLASHINFER_SAMPLER=0 $envs timeout 400 python3 -s tests/e2e/run_llm.py --model /tmp/qwen05_hf \
        --enforce-eager --lengths 12000,300,9000 --max-model-len 16384 --text /tmp/qwen05/kjv.txt \
        --out $T/$name.json "$@" > $T/$name.log 2>&1; echo "$name rc $?"; }
    sp="FLASHPREFILL=1 FLASHPREFILL_ALPHA=1e-30 FLASHPREFILL_MIN_LEN=1024 FLASHPREFILL_LOG_DENSITY=1"
    run off FLASHPREFILL=0
    run patch "$sp" --import patches.patch_loader_vllm_0_${V#0}_0   # the patch loader, explicitly
    EXTRA_PATH=:/tmp/fp_meta run auto "$sp"                          # the plugin's entry point
    for s in patch auto; do grep -c "of causal key blocks" $T/$s.log | sed "s/^/$s: density lines /"; done
    python3 -c "import json, sys; sys.path.insert(0, 'tests/e2e'); from test_vllm_e2e import compare_greedy
off = json.load(open('$T/off.json'))
for s in ('patch', 'auto'):
    print(s, compare_greedy(json.load(open(f'$T/{s}.json')), off) or 'greedy tokens match stock')" ;;
fa4)
    COLLECT_TAG=fa4-bundle bash "$REPO/.fa4_bundle/$1/collect_parts.sh" /tmp/fa4site; rc=$?; echo "rc=$rc"; exit $rc ;;
convert)
    n=$1; dir=/tmp/qwen$n; gguf=$(ls $dir/*.gguf)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/gguf_site \
        $dir/gguf-0.19.0-py3-none-any.whl || exit 1
    setsid nohup bash -c "PYTHONPATH=/tmp/gguf_site python3 $dir/gguf_to_hf.py $gguf /tmp/qwen${n}_hf \
        > /tmp/conv$n.log 2>&1; echo \$? > /tmp/conv$n.done" > /dev/null 2>&1 &
    echo "converting $gguf in the background" ;;
gputests)
    rm -rf /tmp/fp && cp -r "$REPO" /tmp/fp && rm -rf /tmp/fp/.vllm_bundle /tmp/fp/.model_bundle* /tmp/fp/.fa4_bundle
    setsid nohup bash -c "cd /tmp/fp && export PYTHONPATH=/tmp/fp:/tmp/site$(fa4_path) && \
        FLASHPREFILL_GPU_SEEDS=${GPU_SEEDS:-0:60} python3 -m pytest -q -rfE -p no:cacheprovider tests/gpu tests/ops \
        > /tmp/gputests.log 2>&1; echo \$? > /tmp/gputests.done" > /dev/null 2>&1 &
    touch /tmp/gputests.started; echo "GPU tests started" ;;
e2e)   # once the 0.5B model is converted: the plugin inside vLLM against stock FlashAttention (a subset)
    if [ "${1:-fg}" = bg ]; then
        setsid nohup bash -c "bash $REPO/benchmarks/gpu_lease.sh e2e fg > /tmp/e2e.log 2>&1; echo \$? > /tmp/e2e.done" \
            > /dev/null 2>&1 &
        touch /tmp/e2e.started; echo "e2e tests started in the background"; exit 0
    fi
    setup_env "$REPO"; cd "$REPO"
    wait_for /tmp/conv05.done 600 || exit 1
    FLASHPREFILL_TEST_MODEL=/tmp/qwen05_hf FLASHPREFILL_TEST_TEXT=/tmp/qwen05/kjv.txt python3 -m pytest -q -rA \
        -p no:cacheprovider tests/e2e -k "${E2E_CASES:-chunks_2k_prefix_hit}" ;;
opquality)
    n=$1; mode=${2:-fg}
    if [ "$mode" = bg ]; then
        setsid nohup bash "$REPO/benchmarks/gpu_lease.sh" opquality "$n" fg > /tmp/opq$n.log 2>&1 &
        echo "opquality $n started in the background"; exit 0
    fi
    setup_env "$REPO"; cd "$REPO"; mkdir -p /tmp/opq_out
    wait_for /tmp/conv$n.done 600 || exit 1
    tail -3 /tmp/conv$n.log
    name=qwen2.5-coder-$([ "$n" = 05 ] && echo 0.5b || echo 1.5b)-instruct
    python3 -m flashprefill_vllm.eval opquality --model /tmp/qwen${n}_hf --model-name $name \
        --text /tmp/qwen$n/kjv.txt --alphas 0.02,0.05,0.1,0.2,0.3,0.5 --taus 0,0.8,0.9,0.95,0.98 \
        --rules "${OPQ_RULES:-op,pooled_query}" --gqa per_head --out-dir /tmp/opq_out --tag floor 2>&1 | grep -v "it/s\]"
    echo $? > /tmp/opq$n.done ;;
choose)   # choose 05 [15]: wait for those sweeps (and a background e2e run, which holds GPU memory)
    setup_env "$REPO"; cd "$REPO"
    for n in "$@"; do wait_for /tmp/opq$n.done 560 || { tail -5 /tmp/opq$n.log; exit 1; }; done
    [ -e /tmp/e2e.started ] && { wait_for /tmp/e2e.done 300; echo "e2e rc $(cat /tmp/e2e.done)"; \
        grep -E "passed|failed|error" /tmp/e2e.log | tail -3; cp /tmp/e2e.log "$OUT/"; }
    for n in "$@"; do cp /tmp/opq$n.log "$OUT/"; done
    cp /tmp/opq_out/* "$OUT/"
    python3 benchmarks/choose_defaults.py "$OUT"/opquality_*floor.json --out "$OUT/choose_defaults.json" \
        | tee "$OUT/choose_defaults.log" ;;
accuracy)
    setup_env "$REPO"; cd "$REPO"; n=$1; tag=${2:-defaults}
    echo "FLASHPREFILL_ALPHA=${FLASHPREFILL_ALPHA:-} FLASHPREFILL_TAU=${FLASHPREFILL_TAU:-}"
    python3 -m flashprefill_vllm.eval accuracy --model /tmp/qwen${n}_hf --text /tmp/qwen$n/kjv.txt \
        --out-dir "$OUT" --tag "$tag" "${@:3}" 2>&1 | grep -v "it/s\]" | tee "$OUT/accuracy_$n-$tag.log" ;;
queue)   # the lease's GPU jobs in order of priority, one at a time (a vLLM engine must not share the GPU with
         # another process that frees memory while it profiles); results under /tmp/q, copied out by `collect`
    if [ "${1:-fg}" = bg ]; then
        rm -rf /tmp/fpq && mkdir -p /tmp/q && cp -r "$REPO" /tmp/fpq && rm -rf /tmp/fpq/.vllm_bundle /tmp/fpq/.model_bundle* /tmp/fpq/.fa4_bundle
        setsid nohup bash /tmp/fpq/benchmarks/gpu_lease.sh queue fg > /tmp/q/queue.log 2>&1 &
        echo "queue started in the background"; exit 0
    fi
    Q=/tmp/q; L="bash $REPO/benchmarks/gpu_lease.sh"; mkdir -p $Q
    job() { local name=$1 rc; shift; echo "== $(date +%T) start $name"; "$@" > "$Q/$name.log" 2>&1; rc=$?
            echo "== $(date +%T) end $name rc $rc"; }
    yarn='{"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768, "rope_theta": 1000000.0}}'
    [ -e /tmp/gputests.started ] && wait_for /tmp/gputests.done 900
    setup_env "$REPO"; cd "$REPO"
    # FA4 per kept block on the real models' head shapes, to 256K (no model needed: runs while the parts arrive)
    if [ -e /tmp/fa4site/.bundle_sha256 ]; then
        job fa4_05 python3 benchmarks/bench_fa4_sparse.py --heads 14/2 --head-dims 64 --policies per_head \
            --lengths 8192,32768,131072,262144 --chunk-cases 131072 --out-dir $Q --tag qwen05-shape
        job fa4_15 python3 benchmarks/bench_fa4_sparse.py --heads 12/2 --head-dims 128 --policies per_head \
            --lengths 8192,32768,131072,262144 --chunk-cases 131072 --out-dir $Q --tag qwen15-shape
    fi
    wait_for /tmp/conv05.done 900; tail -2 /tmp/conv05.log
    # Left by earlier leases, most needed first: the serve soak (issue 14), the e2e cases not yet run on the FA4
    # route, the accuracy harness at the defaults on FA4, the 1.5B model's TTFT (head_dim 128, if its parts came).
    job soak python3 benchmarks/soak_serve.py --model /tmp/qwen05_hf --tag qwen05 --bursts 2 --burst-size 200 \
        --out-dir $Q
    E2E_CASES="flash_attn_slot or custom_slot or chunks_2k_prefix_hit or 64k or chunked_density or chunked_prompt" \
        job e2e $L e2e fg
    job acc05 env OUT=$Q FLASHPREFILL_MIN_LEN=8192 $L accuracy 05 fa4-gate8k   # gate 8192: as the runs before
    ttft() { python3 benchmarks/bench_ttft.py --chunk-size default --lengths 16384,32768,65536,131071 \
        --max-model-len 131072 --hf-overrides "$yarn" --reps 2 --out-dir $Q "$@"; }
    if ls -d /tmp/qwen15.tar.parts /tmp/qwen15 > /dev/null 2>&1; then
        wait_for /tmp/conv15.done 600 && job ttft15 ttft --model /tmp/qwen15_hf --settings dense,sparse \
            --tag qwen2.5-coder-1.5b-yarn4-defaults-fa4; fi
    job ttft05 ttft --model /tmp/qwen05_hf --settings dense,sparse --tag qwen2.5-coder-0.5b-yarn4-defaults-fa4
    echo "== $(date +%T) queue done" ;;
collect)
    for f in /tmp/gputests.log /tmp/e2e.log /tmp/conv05.log /tmp/conv15.log; do [ -e $f ] && cp $f "$OUT/"; done
    # at most 8 files come back from a call: the queue's folder travels as one archive
    [ -d /tmp/q ] && tar -czf "$OUT/q.tgz" -C /tmp q
    for f in gputests e2e; do echo "== $f (rc $(cat /tmp/$f.done 2>/dev/null || echo running))"; \
        grep -E "passed|failed|error" /tmp/$f.log 2>/dev/null | tail -3; done
    [ -e /tmp/q/queue.log ] && tail -4 /tmp/q/queue.log
    nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader ;;
*)
    echo "unknown step $step"; exit 2 ;;
esac
