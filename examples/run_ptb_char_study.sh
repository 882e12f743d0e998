#!/usr/bin/env bash
# What DSF buys where the recurrence dominates the step: character-level PTB, GRU 1 x 512 (ptb_char_gru_1x512), 6 epochs,
# seed 0, the same batches in every run: exact BPTT, DSF, FT-BPTT and DSF for 4 epochs then BPTT (dsf_then_bptt).
# Two runs at a time, one thread each, at the lowest CPU priority, on the code of commit 809c53a (a worktree beside this
# checkout, so that later changes to the package cannot change a resumed run's arithmetic); run folders in this
# checkout (runs/ptb_char_study, untracked). Run it again to continue: each run resumes from its newest intact
# checkpoint (one every 50 steps). Per-epoch records: docs/figures/ptb_char_study/<mode>.json.
#   examples/run_ptb_char_study.sh &        # train, log runs/ptb_char_study/study.log
#   examples/run_ptb_char_study.sh cost     # every mode's step time and peak memory on this model and batch shape
#                                           # (interleaved, paired ratios; stop other work first, or pause it with
#                                           # kill -STOP): docs/figures/ptb_char_study/cost.json
#   examples/run_ptb_char_study.sh report   # tables, figure and docs/results.md's "What DSF buys" from the records
set -euo pipefail
cd "$(dirname "$0")/.."
main=$PWD
study=(--config ptb_char_gru_1x512 --epochs 6 --switch-epoch 4 --modes dsf bptt dsf_then_bptt ft_bptt
       --output runs/ptb_char_study --record docs/figures/ptb_char_study
       --set training.report_to=none --set training.trainer_args.disable_tqdm=true)
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
cost=docs/figures/ptb_char_study/cost.json
case "${1:-}" in
    cost)
        exec .venv/bin/python benchmarks/train_step.py --layers 1 --hidden 512 --batch 128 --length 128 --vocab 53 \
            --modes bptt dsf ft_bptt --threads 1 --warmup 2 --repeats 10 --json "$cost";;
    report)
        exec .venv/bin/python examples/reproduce_ptb.py "${study[@]}" --report-only --results-doc docs/results.md \
            --block ptb_char_study $([ -e "$cost" ] && echo --cost "$cost");;
    "") ;;
    *) echo "usage: $0 [cost | report]" >&2; exit 2;;
esac
tree=$main/../sfrnn_char_study_809c53a
[ -d "$tree" ] || git worktree add --detach "$tree" 809c53a
[ -e "$tree/.venv" ] || ln -s "$main/.venv" "$tree/.venv"
mkdir -p runs/ptb_char_study docs/figures/ptb_char_study
[ -e "$tree/runs" ] || ln -s "$main/runs" "$tree/runs"
[ -e "$tree/docs/figures/ptb_char_study" ] || ln -s "$main/docs/figures/ptb_char_study" "$tree/docs/figures/ptb_char_study"
cd "$tree"
export PYTHONPATH=$tree
export MALLOC_MMAP_THRESHOLD_=17179869184 MALLOC_TRIM_THRESHOLD_=17179869184 MALLOC_TOP_PAD_=1073741824
exec nice -n 19 .venv/bin/python examples/reproduce_ptb.py "${study[@]}" --jobs 2 --threads 1 --no-report \
    >> runs/ptb_char_study/study.log 2>&1
