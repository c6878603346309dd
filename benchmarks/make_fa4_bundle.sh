#!/usr/bin/env bash
# make_fa4_bundle.sh OUTDIR -- CPU machine: the few wheels that vLLM 0.26's FA4 CuTe-DSL forward needs on top of
# the device's vLLM bundle (which leaves them out unless built with INCLUDE_OPTIONAL=1, ~5 extra parts):
# nvidia-cutlass-dsl 4.6.0 (+ libs-base, libs-core, libs-cu13), quack-kernels 0.6.3, torch-c-dlpack-ext 0.1.5.
# Left out on purpose: cuda-python (a meta package; the image has cuda-bindings/cuda-core), nvidia-cuda-nvdisasm
# (only for SASS dumps), protobuf < 7 (only the DSL's profiler imports it).
# Output: OUTDIR/p00, p01 (each one device call), unpacked on the device by
#     bash OUTDIR/pNN/collect_parts.sh /tmp/fa4site      # rc 3 until every part is there
# then  export PYTHONPATH=/tmp/site:/tmp/fa4site:/tmp/fa4site/nvidia_cutlass_dsl/dsl_packages:.
# (the wheel's .pth line that adds dsl_packages is not read from a PYTHONPATH folder, hence the third entry).
set -euo pipefail
OUT=${1:?usage: make_fa4_bundle.sh OUTDIR}; HERE=$(cd "$(dirname "$0")" && pwd); SHARED=${SHARED:-$HERE/../../shared/device}
PY=${PYTHON:-python3}; PART_MAX_MIB=${PART_MAX_MIB:-55}
mkdir -p "$OUT/.cache/wheels"; OUT=$(cd "$OUT" && pwd)
PLAT=(--only-binary=:all: --python-version 3.12 --implementation cp)
for n in $(seq 5 39); do PLAT+=(--platform "manylinux_2_${n}_x86_64"); done; PLAT+=(--platform manylinux2014_x86_64)
REQS="nvidia-cutlass-dsl==4.6.0 nvidia-cutlass-dsl-libs-base==4.6.0 nvidia-cutlass-dsl-libs-core==4.6.0
      nvidia-cutlass-dsl-libs-cu13==4.6.0 quack-kernels==0.6.3 torch-c-dlpack-ext==0.1.5"
$PY -m pip download -q --no-deps "${PLAT[@]}" -d "$OUT/.cache/wheels" $REQS
STAGE=$OUT/.cache/stage; rm -rf "$STAGE"; mkdir -p "$STAGE"
$PY -m pip install -q --no-deps --no-index --no-compile --find-links "$OUT/.cache/wheels" "${PLAT[@]}" \
    --target "$STAGE/fa4_site" $REQS
find "$STAGE" -name __pycache__ -type d -prune -exec rm -rf {} +
TB=fa4_site.tar.xz; rm -rf "$OUT"/p[0-9][0-9] "$OUT/$TB"
tar -C "$STAGE" -cf - fa4_site | xz -T2 -6 > "$OUT/$TB"
SIZE=$(stat -c %s "$OUT/$TB"); MAX=$((PART_MAX_MIB * 1048576)); NP=$(( (SIZE + MAX - 1) / MAX )); PS=$(( (SIZE + NP - 1) / NP ))
(cd "$OUT" && split -b "$PS" -d -a 2 "$TB" "$TB.part" && sha256sum "$TB" "$TB".part* > SHA256SUMS)
for p in "$OUT/$TB".part*; do d=$OUT/p${p##*.part}; mkdir -p "$d"; mv "$p" "$d/"; cp "$OUT/SHA256SUMS" "$SHARED/collect_parts.sh" "$d/"; done
rm -f "$OUT/$TB"; echo "make_fa4_bundle: $SIZE bytes in $NP part(s)"
