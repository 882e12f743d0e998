"""Reproduce the paper's Penn Treebank experiment: the same GRU model trained with exact BPTT, DSF and FT-BPTT from the
same seed, initial weights and data order; validation perplexity per epoch and wall-clock per epoch; a results table
(Markdown + JSON) and the figures of the paper's Fig. 1 (perplexity against epochs and against seconds).

    python examples/reproduce_ptb.py --config ptb_gru_1x256 --epochs 6          # StepLR decays at 1/3 and 2/3
    python examples/reproduce_ptb.py --config ptb_gru_1x256 --epochs 12 --hidden 128
    python examples/reproduce_ptb.py --config ptb_gru_3x256 --epochs 30 --output runs/reproduce-gpu
    python examples/reproduce_ptb.py --modes bptt dsf ft_bptt dsf_calibrated diag_jacobian   # and the diag(J) runs

Each mode trains in `<output>/<mode>/` through `sfrnn_hf.train.run` (the Trainer, plain Adam lr 1e-3 with coupled
weight decay 1e-4, batch 128). Batches hold sentences of similar length by default (`--sampling`): the same updates
per epoch with far less padding. Run it again, with the same flags, to continue: a finished mode is skipped, an
interrupted one resumes from its last checkpoint; a flag that differs from the run's start is refused, by name. The
model after the first epoch is kept in `<mode>/early/` and the best in `<mode>/` for `python -m sfrnn_hf.fidelity`.
Measured results: docs/results.md.
"""

import argparse
import json
import math
import os
import time
from pathlib import Path

from transformers import TrainerCallback

from sfrnn_hf.train import run, settings_changed_since_start
from sfrnn_hf.training_config import load_config

# Each run's name and the config overrides that define it: the paper's three gradients, then this package's two
# feedbacks that follow the model's own diag(J) (README "Beyond the paper").
RUNS = {
    "bptt": ["model.gradient_mode=bptt"],
    "dsf": ["model.gradient_mode=dsf"],
    "ft_bptt": ["model.gradient_mode=ft_bptt"],
    "dsf_calibrated": ["model.gradient_mode=dsf", "model.feedback_type=calibrated"],
    "diag_jacobian": ["model.gradient_mode=diag_jacobian"],
}
PAPER_RUNS = ("bptt", "dsf", "ft_bptt")


class EpochClock(TrainerCallback):
    """Appends each epoch's training seconds to `epochs.jsonl` and keeps the first epoch's model in `early/`."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.started = None

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        if not state.is_world_process_zero or self.started is None:
            return
        epoch = round(state.epoch)
        with open(self.folder / "epochs.jsonl", "a") as handle:
            handle.write(json.dumps({"epoch": epoch, "train_seconds": time.perf_counter() - self.started}) + "\n")
        if epoch == 1 and model is not None:
            model.save_pretrained(self.folder / "early")


def _last_by_epoch(path: Path, key: str) -> dict[int, float]:
    """`{epoch: value}` from a JSON-lines file (a resumed run may repeat an epoch: the last record wins)."""
    values = {}
    if path.exists():
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if key in record:
                values[round(record["epoch"])] = record[key]
    return values


def train_mode(args, mode: str) -> dict:
    folder = Path(args.output) / mode
    overrides = [*RUNS[mode], f"training.output_dir={folder}", f"training.epochs={args.epochs}",
                 f"training.seed={args.seed}", "training.save_total_limit=2", *args.set]
    if args.sampling != "random":
        overrides.append(f"training.trainer_args.train_sampling_strategy={args.sampling}")
    if args.hidden:
        overrides.append(f"model.hidden_size={args.hidden}")
    if args.max_train_samples:
        overrides.append(f"data.max_train_samples={args.max_train_samples}")
    if folder.is_dir() and any(name.startswith("checkpoint-") for name in os.listdir(folder)):
        overrides.append("training.resume_from_checkpoint=true")
    experiment = load_config(args.config, overrides)
    # A run continued, or a finished one put in the table, must be the run these flags describe.
    changes = settings_changed_since_start(experiment, folder)
    if changes:
        raise SystemExit(f"[{mode}] {folder} holds a run started with other settings: {'; '.join(changes)}. Run "
                         f"again with the flags it started with, or choose another --output.")
    if (folder / "results.json").exists():
        print(f"[{mode}] finished earlier: {folder / 'results.json'}")
        return json.loads((folder / "results.json").read_text())
    folder.mkdir(parents=True, exist_ok=True)
    print(f"[{mode}] training {args.config} for {args.epochs} epochs in {folder}")
    _, results = run(experiment, callbacks=[EpochClock(folder)])
    return results


def collect(args, mode: str, results: dict) -> dict:
    folder = Path(args.output) / mode
    perplexity = _last_by_epoch(folder / "log_history.jsonl", "eval_perplexity")
    seconds = _last_by_epoch(folder / "epochs.jsonl", "train_seconds")
    epochs = sorted(perplexity)
    best_epoch = min(epochs, key=perplexity.get) if epochs else None
    return {
        "mode": mode,
        "epochs": epochs,
        "validation_perplexity": [perplexity[e] for e in epochs],
        "train_seconds": [seconds.get(e, math.nan) for e in epochs],
        "best_validation_perplexity": perplexity.get(best_epoch, math.nan),
        "best_epoch": best_epoch,
        "epochs_reached": max(epochs) if epochs else 0,
        "seconds_per_epoch": sum(seconds.values()) / len(seconds) if seconds else math.nan,
        "test_perplexity_of_best": results.get("test_perplexity", math.nan),
    }


def write_table(args, rows: list[dict]) -> str:
    lines = [
        f"PTB sentence level, `{args.config}`{f' with hidden_size={args.hidden}' if args.hidden else ''}, "
        f"{args.epochs} epochs, seed {args.seed}.",
        "",
        "| mode | best validation perplexity | at epoch | epochs run | seconds / epoch | test perplexity (best) |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(f"| {row['mode']} | {row['best_validation_perplexity']:.2f} | {row['best_epoch']} | "
                     f"{row['epochs_reached']} | {row['seconds_per_epoch']:.0f} | {row['test_perplexity_of_best']:.2f} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (by_epoch, by_time) = plt.subplots(1, 2, figsize=(11, 4.2))
    for row in rows:
        by_epoch.plot(row["epochs"], row["validation_perplexity"], marker="o", label=row["mode"])
        elapsed, total = [], 0.0
        for seconds in row["train_seconds"]:
            total += seconds
            elapsed.append(total)
        by_time.plot(elapsed, row["validation_perplexity"], marker="o", label=row["mode"])
    by_epoch.set_xlabel("epoch")
    by_time.set_xlabel("training wall-clock (s)")
    for axis in (by_epoch, by_time):
        axis.set_ylabel("validation perplexity")
        axis.set_yscale("log")
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="ptb_gru_1x256", help="a shipped PTB config (or a YAML path)")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--hidden", type=int, help="override the config's hidden_size")
    parser.add_argument("--modes", nargs="+", default=list(PAPER_RUNS), choices=list(RUNS),
                        help="runs to train (default: the paper's three; add dsf_calibrated and diag_jacobian)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sampling", choices=("group_by_length", "random"), default="group_by_length",
                        help="batches of sentences of similar length (transformers' LengthGroupedSampler; PTB: 3%% "
                             "padding instead of 59%%) or uniformly random ones")
    parser.add_argument("--max-train-samples", type=int, help="train on the first N sentences (smoke tests)")
    parser.add_argument("--set", action="append", default=[], metavar="section.key=value", help="config override")
    parser.add_argument("--output", default="runs/reproduce_ptb")
    args = parser.parse_args(argv)

    rows = [collect(args, mode, train_mode(args, mode)) for mode in args.modes]
    output = Path(args.output)
    (output / "results.json").write_text(json.dumps({"config": args.config, "epochs": args.epochs,
                                                      "hidden": args.hidden, "runs": rows}, indent=2))
    table = write_table(args, rows)
    (output / "results.md").write_text(table)
    plot(rows, output / "perplexity.png")
    print(table)
    print(f"wrote {output / 'results.md'}, {output / 'results.json'}, {output / 'perplexity.png'}")


if __name__ == "__main__":
    main()
