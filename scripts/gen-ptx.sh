#!/usr/bin/env bash
# Regenerates crates/hetmem-cuda/src/kernels/kernels.ptx from kernels.cu with NVRTC 13.0, whose
# PTX (ISA 9.0) a CUDA 13.0 driver accepts. NVRTC comes from PyPI into a cache folder outside the
# repository: it is NVIDIA's, never commit it.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${NVRTC_DIR:-$HOME/.cache/hetmem/nvrtc-13.0.88}
if [ ! -e "$dir/nvidia/cu13/lib/libnvrtc.so.13" ]; then
  pip install --quiet --no-deps --target "$dir" nvidia-cuda-nvrtc==13.0.88
fi
out=crates/hetmem-cuda/src/kernels/kernels.ptx
LD_LIBRARY_PATH="$dir/nvidia/cu13/lib" cargo run -q -p hetmem-cuda --example gen_ptx > "$out.new"
mv "$out.new" "$out"
echo "wrote $out ($(wc -c < "$out") bytes)"
