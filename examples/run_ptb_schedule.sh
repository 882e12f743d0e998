#!/usr/bin/env bash
# The word-level protocol with one schedule: DSF for epochs 1-10, exact BPTT for epochs 11-30 (dsf_then_bptt), all else
# as examples/run_ptb_protocol.sh. Its first 10 epochs are DSF's own, so the run branches off DSF's whole checkpoint
# after epoch 10 (optimizer, scheduler, RNG and sampler state: runs/ptb_rerun/dsf_epoch10, kept by
# `RERUN_MODES=dsf examples/run_ptb_rerun.sh`) and resumes it under the schedule: the switch after step N equals resuming
# step N's checkpoint with the other mode (tests/test_gradient_schedule.py). Why epoch 10: StepLR divides the lr by 10
# after epochs 10 and 20, and in every mode epochs 21-30 move validation perplexity by under 0.2; a switch after
# epoch 20 could not close DSF's 5-point gap, a switch at the first decay leaves BPTT two thirds of the run.
#   examples/run_ptb_schedule.sh &          # train (nice 19), log runs/ptb_rerun/schedule.log; run again to continue
# Per-epoch record: docs/figures/ptb_protocol/dsf_then_bptt.json (epochs 1-10 are DSF's records).
set -euo pipefail
cd "$(dirname "$0")/.."
out=runs/ptb_rerun/ptb_protocol
branch=runs/ptb_rerun/dsf_epoch10
run=$out/dsf_then_bptt
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ ! -d "$run" ]; then
    [ -e "$branch/manifest.json" ] || { echo "no $branch yet: DSF has not finished epoch 10" >&2; exit 1; }
    rm -rf "$run.tmp" && mkdir -p "$run.tmp"
    cp -r "$branch" "$run.tmp/checkpoint-3290"
    cp -r "$out/dsf/tokenizer" "$run.tmp/tokenizer"
    .venv/bin/python - "$out/dsf" "$run" "$run.tmp" <<'PY'
import json, sys
from pathlib import Path
from sfrnn_hf.training.checkpoints import write_manifest
dsf, run, staging = sys.argv[1:]
# DSF's epochs 1-10 are the branch's; the checkpoint's own state points at the DSF run's folders: point it at this run.
epochs = [json.loads(line) for line in Path(dsf, "epochs.jsonl").read_text().splitlines() if line.strip()]
Path(staging, "epochs.jsonl").write_text("".join(json.dumps(e | {"gradient_mode": "dsf"}) + "\n"
                                                 for e in epochs if e["epoch"] <= 10))
state_path = Path(staging, "checkpoint-3290", "trainer_state.json")
state = json.loads(state_path.read_text())
state["best_model_checkpoint"] = f"{run}/checkpoint-3290"
for recorder in [state["stateful_callbacks"]["EpochRecorder"]]:
    for entry in recorder if isinstance(recorder, list) else [recorder]:
        entry["args"]["folder"] = run
state_path.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
write_manifest(str(Path(staging, "checkpoint-3290")))
PY
    mv "$run.tmp" "$run"
fi
export MALLOC_MMAP_THRESHOLD_=17179869184 MALLOC_TRIM_THRESHOLD_=17179869184 MALLOC_TOP_PAD_=1073741824
exec nice -n 19 .venv/bin/python examples/reproduce_ptb.py --epochs 30 --threads 1 --modes dsf_then_bptt \
    --switch-epoch 10 --output "$out" --record docs/figures/ptb_protocol --no-report \
    --set training.report_to=none --set training.trainer_args.disable_tqdm=true >> runs/ptb_rerun/schedule.log 2>&1
