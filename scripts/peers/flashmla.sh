#!/usr/bin/env bash
# Puts FlashMLA's dense decode kernel, as vLLM's wheel ships it compiled, into the ignored `.peers/`
# folder, to time beside ours in `moecluster bench kernels` (a peer to measure against, never to
# copy or commit):  scripts/peers/flashmla.sh [DEST]   (default .peers)
#
# The wheel is chosen by the torch that will load it: vLLM 0.26.0 is built against torch 2.11 (the
# lent GPU machines' torch) and CUDA 13; its extension uses torch's stable C ABI. The CUDA 13 runtime
# library comes from NVIDIA's own wheel, for machines whose torch was built against CUDA 12.
# Written: DEST/flashmla/vllm/{_flashmla_C.abi3.so, third_party/flashmla/flash_mla_interface.py}
#          DEST/flashmla/lib/libcudart.so.13
set -euo pipefail
DEST=${1:-.peers}; VER=${VLLM_VERSION:-0.26.0}; CUDART=${CUDART_VERSION:-13.0.96}
[ -d .git ] && { grep -qxF "/$DEST/" .git/info/exclude 2>/dev/null || echo "/$DEST/" >> .git/info/exclude; }
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
python3 -m pip download -q --no-deps -d "$tmp" "vllm==$VER" "nvidia-cuda-runtime==$CUDART"
root="$DEST/flashmla"; rm -rf "$root"; mkdir -p "$root/lib"
(cd "$tmp" && unzip -q vllm-*.whl 'vllm/_flashmla_C.abi3.so' 'vllm/third_party/flashmla/*' \
  && unzip -q nvidia_cuda_runtime-*.whl 'nvidia/cu13/lib/libcudart.so.13')
mkdir -p "$root/vllm"
cp -r "$tmp/vllm/_flashmla_C.abi3.so" "$tmp/vllm/third_party" "$root/vllm/"
: > "$root/vllm/__init__.py"
cp "$tmp/nvidia/cu13/lib/libcudart.so.13" "$root/lib/"
echo "FlashMLA from vllm $VER written to $root ($(du -sh "$root" | cut -f1))"
