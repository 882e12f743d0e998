#!/usr/bin/env bash
# ONE prepared GPU check (about 5 minutes on an H200; stops itself at 9 minutes): the DSF / FT-BPTT / cuDNN-BPTT
# training step of the recurrent stack and of the full LM, and the scan's achieved bandwidth, for B = 32, bf16
# (autocast), d in {512, 1024}, T in {256, 1024, 4096}. Prints DSF/BPTT ratios (goal: DSF >= 2x faster than cuDNN BPTT
# at T >= 1024) and the scan bandwidth as % of the card's peak (goal: >= 70%; H200: 4.8 TB/s).
#
#   bash benchmarks/gpu_check.sh 2>&1 | tee gpu_check.log
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
deadline=$((SECONDS + 540))
run() {  # run a step unless the time budget is spent
  if (( SECONDS >= deadline )); then echo "SKIPPED (time budget): $*"; return; fi
  timeout $((deadline - SECONDS)) "$PY" "$@" || echo "FAILED or timed out: $*"
}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>/dev/null || true
"$PY" -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
"$PY" -c "import triton; print('triton', triton.__version__)" 2>/dev/null || echo "triton: not installed (torch backward)"
# correctness first, on this GPU: fast path against the reference form, all cells, padding, bf16 autocast; the
# diag_jacobian mode and the calibrated feedback against the CPU path
run -m pytest -q -x tests/test_fused_dsf.py tests/test_gpu_dsf.py tests/test_diag_jacobian_mode.py
echo "== scan bandwidth (bf16 errors, fp32 accumulation) =="
run benchmarks/scan.py --device cuda --dtype bfloat16 --states 512 1024 --lengths 256 1024 4096 --repeats 20
echo "== recurrent stack, GRU 3 layers, bf16 autocast (all modes, and dsf with the calibrated feedback) =="
for d in 512 1024; do
  run benchmarks/layer.py --device cuda --cells gru --hidden "$d" --lengths 256 1024 4096 --dtypes bfloat16 \
      --calibrated --repeats 5 --warmup 2
done
echo "== recurrent stack, LSTM and tanh RNN 3 x 1024, bf16 =="
run benchmarks/layer.py --device cuda --cells lstm rnn --hidden 1024 --lengths 1024 --dtypes bfloat16 --repeats 5 --warmup 2
echo "== full LM step (PTB vocab 10k), GRU 3 x 1024, bf16 =="
for T in 256 1024; do
  run benchmarks/train_step.py --device cuda --hidden 1024 --length "$T" --dtypes bfloat16 --repeats 5 --warmup 2
done
echo "== LoRA on the recurrent weights: DSF+LoRA / DSF =="
run benchmarks/layer.py --device cuda --cells gru --hidden 1024 --lengths 1024 --dtypes bfloat16 --modes dsf --lora \
    --repeats 5 --warmup 2
echo "total ${SECONDS}s"
