#!/usr/bin/env bash
# The paper's PTB protocol (GRU 1 x 256, 30 epochs, random batches), all five modes, three at a time, one thread each,
# at the lowest CPU priority. Run it again to continue: every mode resumes from its newest intact checkpoint.
# Per-epoch records: docs/figures/ptb_protocol/<mode>.json; log: runs/ptb_protocol.log.
#   examples/run_ptb_protocol.sh          # train (in the foreground; add & to background it)
#   examples/run_ptb_protocol.sh report   # table, figure and docs/results.md's tables from the records so far
set -euo pipefail
cd "$(dirname "$0")/.."
protocol=(--epochs 30 --jobs 3 --threads 1 --modes bptt dsf ft_bptt dsf_calibrated diag_jacobian
          --output runs/ptb_protocol --record docs/figures/ptb_protocol
          --set training.report_to=none --set training.trainer_args.disable_tqdm=true)
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ "${1:-}" = report ]; then
    exec .venv/bin/python examples/reproduce_ptb.py "${protocol[@]}" --report-only --results-doc docs/results.md
fi
mkdir -p runs
# The MALLOC_* settings only keep glibc from returning each step's large buffers to the system; no result changes.
export MALLOC_MMAP_THRESHOLD_=17179869184 MALLOC_TRIM_THRESHOLD_=17179869184 MALLOC_TOP_PAD_=1073741824
exec nice -n 19 .venv/bin/python examples/reproduce_ptb.py "${protocol[@]}" "$@" >> runs/ptb_protocol.log 2>&1
