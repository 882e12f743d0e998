#!/usr/bin/env bash
# Rerun of the protocol's paper modes (bptt, dsf, ft_bptt) from seed 0, with the flags of run_ptb_protocol.sh, on the
# code of commit c8a2de2, to regenerate the kept epoch-10 and epoch-30 models (lost with a machine change) for the
# gradient-fidelity measurements of docs/results.md. The code runs from a worktree beside this checkout; the run
# folder stays in this checkout (runs/ptb_rerun, untracked). Run it again to continue: it resumes from each mode's
# newest intact checkpoint (one every 50 steps).
#   examples/run_ptb_rerun.sh &         # train (nice 19), log runs/ptb_rerun/rerun.log
#   examples/run_ptb_rerun.sh record    # copy the per-epoch records to docs/figures/ptb_protocol/rerun/ (to commit)
set -euo pipefail
cd "$(dirname "$0")/.."
main=$PWD
out=$main/runs/ptb_rerun
if [ "${1:-}" = record ]; then
    mkdir -p docs/figures/ptb_protocol/rerun
    cp "$out"/rerun_record/{bptt,dsf,ft_bptt}.json docs/figures/ptb_protocol/rerun/
    exit 0
fi
tree=$main/../sfrnn_rerun_c8a2de2
[ -d "$tree" ] || git worktree add --detach "$tree" c8a2de2
[ -e "$tree/.venv" ] || ln -s "$main/.venv" "$tree/.venv"
mkdir -p "$out"
[ -e "$tree/runs" ] || ln -s "$out" "$tree/runs"
cd "$tree"
export PYTHONPATH=$tree HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export MALLOC_MMAP_THRESHOLD_=17179869184 MALLOC_TRIM_THRESHOLD_=17179869184 MALLOC_TOP_PAD_=1073741824
exec nice -n 19 .venv/bin/python examples/reproduce_ptb.py --epochs 30 --jobs 3 --threads 1 --modes bptt dsf ft_bptt \
    --output runs/ptb_protocol --record runs/rerun_record \
    --set training.report_to=none --set training.trainer_args.disable_tqdm=true >> runs/rerun.log 2>&1
