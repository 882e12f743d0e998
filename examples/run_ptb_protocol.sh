#!/usr/bin/env bash
# The paper's PTB protocol (GRU 1 x 256, 30 epochs, random batches), all five modes, three at a time, one thread each,
# at the lowest CPU priority. Run it again to continue: every mode resumes from its newest intact checkpoint.
# Per-epoch records: docs/figures/ptb_protocol/<mode>.json; log: runs/ptb_protocol.log.
#   examples/run_ptb_protocol.sh          # train (in the foreground; add & to background it)
#   examples/run_ptb_protocol.sh report   # table, figure and docs/results.md's tables from the records so far
#   examples/run_ptb_protocol.sh cost     # every mode's step time and peak memory at the protocol's shape (quiet machine)
set -euo pipefail
cd "$(dirname "$0")/.."
modes=(bptt dsf ft_bptt dsf_calibrated diag_jacobian)
protocol=(--epochs 30 --jobs 3 --threads 1 --modes "${modes[@]}"
          --output runs/ptb_protocol --record docs/figures/ptb_protocol
          --set training.report_to=none --set training.trainer_args.disable_tqdm=true)
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
cost=docs/figures/ptb_protocol/cost.json
case "${1:-}" in
    cost)  # every mode's step at the protocol's shape: 128 random sentences pad to 55 tokens on average
        exec .venv/bin/python benchmarks/train_step.py --layers 1 --hidden 256 --batch 128 --length 55 --vocab 10003 \
            --modes bptt dsf ft_bptt --threads 1 --warmup 2 --repeats 10 --json "$cost";;
    report)  # with the DSF-then-BPTT run (examples/run_ptb_schedule.sh) once it has a record
        schedule=()
        [ ! -e docs/figures/ptb_protocol/dsf_then_bptt.json ] || schedule=(--modes "${modes[@]}" dsf_then_bptt --switch-epoch 10)
        exec .venv/bin/python examples/reproduce_ptb.py "${protocol[@]}" "${schedule[@]}" --report-only \
            --results-doc docs/results.md $([ -e "$cost" ] && echo --cost "$cost");;
esac
mkdir -p runs
# The MALLOC_* settings only keep glibc from returning each step's large buffers to the system; no result changes.
export MALLOC_MMAP_THRESHOLD_=17179869184 MALLOC_TRIM_THRESHOLD_=17179869184 MALLOC_TOP_PAD_=1073741824
exec nice -n 19 .venv/bin/python examples/reproduce_ptb.py "${protocol[@]}" "$@" >> runs/ptb_protocol.log 2>&1
