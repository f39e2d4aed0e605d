#!/usr/bin/env bash
# The benchmark-only venv holding PyTorch for ../shared/peers/torch_agcg.py.
#
#   bash benchmarks/peer_venv.sh          # creates .bench-venv if needed; prints its python
#
# PyTorch is never a dependency of agcg-jax: it lives only in this separate
# venv (default <repo>/.bench-venv, git-ignored; BENCH_VENV=... to move it).
# Idempotent: a venv whose `import torch` already works is reused as is.
#
# Where it comes from: PyPI's Linux `torch` wheel is the CUDA build; it runs
# on the CPU, but its `import torch` loads libcudnn & co., so the CUDA
# packages (nvidia-*, cuda-toolkit, triton) must be installed with it: a
# `--no-deps` torch plus its pure-Python deps fails with "libcudnn.so.9:
# cannot open shared object file" (checked 2026-11-28, torch 2.14.1). The
# full install is about 5.4 GB and took 1 min here (fast mirror; longer on a
# slow link). TORCH_SPEC overrides the requirement, e.g.
# TORCH_SPEC='torch==2.13.0+cpu' where a local wheel index offers a CPU-only
# build (~0.2 GB, seconds).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BENCH_VENV="${BENCH_VENV:-$ROOT/.bench-venv}"
TORCH_SPEC="${TORCH_SPEC:-torch>=2.4}"
PY="$BENCH_VENV/bin/python"

if [ -x "$PY" ] && "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "$PY"
  exit 0
fi
echo "peer_venv: installing $TORCH_SPEC into $BENCH_VENV (first run: ~5.4 GB, a minute or more)" >&2
start=$(date +%s)
python3 -m venv "$BENCH_VENV" >&2
"$PY" -m pip install --quiet --upgrade pip >&2
"$PY" -m pip install --quiet "$TORCH_SPEC" numpy >&2
# The check that matters: the wheel imports and trains on the CPU.
"$PY" - >&2 <<'EOF'
import torch
x = torch.randn(4, 3, requires_grad=True)
(x * x).sum().backward()
assert torch.allclose(x.grad, 2 * x)
print(f"peer_venv: torch {torch.__version__} imports and runs on the CPU")
EOF
echo "peer_venv: ready in $(( $(date +%s) - start )) s, $(du -sh "$BENCH_VENV" | cut -f1)" >&2
echo "$PY"
