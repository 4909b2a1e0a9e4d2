#!/usr/bin/env bash
# Lay out the `gpu` extra's wheels for the lent GPU machine (no network there; 64 MiB per call).
#
#   tools/device_wheels.sh            # writes .whl/, .whlA/, .whlB/ (add them to .git/info/exclude)
#
# .whl: nvidia-cudnn-frontend (fp8 attention). .whlA + .whlB: FlashAttention 4 and the CuTe DSL,
# whose 92 MB nvidia-cutlass-dsl-libs-cu13 wheel is split in two halves. On the device, three calls
# in a row (it keeps /tmp only while warm, 30 s between calls):
#   carry .whlA: mkdir -p /tmp/stash && cp .whlA/* /tmp/stash/
#   carry .whlB: cp .whlB/* /tmp/stash/
#   carry .whl:  cp .whl/*.whl /tmp/stash/ && cd /tmp/stash && cat cu13part.* > nvidia_cutlass_dsl_libs_cu13-4.8.1-cp312-cp312-manylinux_2_28_x86_64.whl
#                && rm cu13part.* && cd - && python3 -m pip install -q --no-index --no-deps --target /tmp/site /tmp/stash/*.whl
#                && export PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages:.   (the DSL's .pth is not read under --target)
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
pip_download() {
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$tmp" "$@"
}
pip_download nvidia-cudnn-frontend==1.32.0 flash-attn-4==4.0.0b36 nvidia-cutlass-dsl==4.8.1 \
  nvidia-cutlass-dsl-libs-base==4.8.1 nvidia-cutlass-dsl-libs-core==4.8.1 nvidia-cutlass-dsl-libs-cu13==4.8.1 \
  apache-tvm-ffi==0.1.15.post2 quack-kernels==0.6.5 torch-c-dlpack-ext==0.1.5 cuda-bindings==13.5.0
rm -rf .whl .whlA .whlB && mkdir -p .whl .whlA .whlB
mv "$tmp"/nvidia_cudnn_frontend-*.whl .whl/
split -b 46000000 "$tmp"/nvidia_cutlass_dsl_libs_cu13-*.whl "$tmp"/cu13part.
mv "$tmp"/cu13part.aa .whlA/
mv "$tmp"/cu13part.ab "$tmp"/cuda_bindings-*.whl .whlB/
rm "$tmp"/nvidia_cutlass_dsl_libs_cu13-*.whl
mv "$tmp"/*.whl .whlA/
rmdir "$tmp" 2>/dev/null || true
du -sh .whl .whlA .whlB
