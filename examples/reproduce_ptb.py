"""Reproduce the paper's Penn Treebank experiment: the same GRU model trained with exact BPTT, DSF and FT-BPTT from the
same seed, initial weights and data order; validation perplexity per epoch and wall-clock per epoch; a results table
(Markdown + JSON) and the figures of the paper's Fig. 1 (perplexity against epochs and against seconds).

    python examples/reproduce_ptb.py --epochs 30 --jobs 3 --record docs/figures/ptb_protocol   # the paper's protocol
    python examples/reproduce_ptb.py --epochs 6 --sampling group_by_length                     # a quick side run
    python examples/reproduce_ptb.py --modes bptt dsf ft_bptt dsf_calibrated diag_jacobian      # and the diag(J) runs
    python examples/reproduce_ptb.py --report-only --record docs/figures/ptb_protocol          # table + figure only
    python examples/reproduce_ptb.py --report-only --export-to hub --cards model_cards         # publish finished modes

Each mode trains in `<output>/<mode>/` through `sfrnn_hf.training.train.run` (the Trainer, plain Adam lr 1e-3 with coupled
weight decay 1e-4, batch 128, StepLR x0.1 after 1/3 and 2/3 of the run). Batches are 128 sentences drawn uniformly
at random, as the paper's released code does (`--sampling group_by_length` groups similar lengths: less padding, a
different experiment). `--jobs N` trains N modes at once, each in its own process.

Run it again, with the same flags, to continue: a finished mode is skipped, an interrupted one resumes exactly from
its newest intact checkpoint (one every `--save-steps` steps and at each epoch's end); a flag that differs from the
run's start is refused, by name. After every epoch `<record>/<mode>.json` is rewritten with all finished epochs
(validation perplexity, training seconds, load average). The models after the `--keep-epochs` are kept in
`<mode>/epoch-<e>/` and the best in `<mode>/` for `python -m sfrnn_hf.training.fidelity`, whose JSON files
(`<record>/fidelity/<mode>_epoch<e>.json`) `--results-doc` turns into a table too. `--export-to` writes each finished
mode's best model as a Hub folder (`sfrnn-export`'s) with its measured validation and test perplexity, and `--cards`
keeps a copy of each card. Measured results: docs/results.md.
"""

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from sfrnn_hf.training.checkpoints import write_atomically
from sfrnn_hf.training.run_folder import earlier_run
from sfrnn_hf.training.train import run, settings_changed_since_start
from sfrnn_hf.training.config import load_config

# Each run's name and the config overrides that define it: the paper's three gradients, then this package's two
# feedbacks that follow the model's own diag(J) (README "Beyond the paper").
RUNS = {
    "bptt": ["model.gradient_mode=bptt"],
    "dsf": ["model.gradient_mode=dsf"],
    "ft_bptt": ["model.gradient_mode=ft_bptt"],
    "dsf_calibrated": ["model.gradient_mode=dsf_calibrated"],
    "diag_jacobian": ["model.gradient_mode=diag_jacobian"],
    "dsf_then_bptt": ["model.gradient_mode=dsf"],  # then exact BPTT after --switch-epoch epochs (mode_overrides)
}
PAPER_RUNS = ("bptt", "dsf", "ft_bptt")
SCHEDULED_RUNS = {"dsf_then_bptt": "bptt"}  # a run that starts in its RUNS mode and switches to this one


def mode_overrides(args, mode: str) -> list[str]:
    """The config overrides that define `mode`: RUNS's, and for a scheduled run its switch after `--switch-epoch`."""
    if mode not in SCHEDULED_RUNS:
        return list(RUNS[mode])
    if not args.switch_epoch:
        raise SystemExit(f"[{mode}] needs --switch-epoch (the epochs trained before it switches to "
                         f"{SCHEDULED_RUNS[mode]}).")
    switch = f"{{after_epochs: {args.switch_epoch}, gradient_mode: {SCHEDULED_RUNS[mode]}}}"
    return RUNS[mode] + [f"training.gradient_mode_schedule=[{switch}]"]
SAMPLINGS = ("random", "group_by_length")


class EpochRecorder(TrainerCallback, ExportableState):
    """Once each epoch's evaluation is in a checkpoint: appends `{epoch, validation_perplexity, train_seconds,
    load_average, ...}` to `<folder>/epochs.jsonl`, and keeps the model of the epochs in `keep_epochs` in
    `<folder>/epoch-<e>/`.

    An epoch is recorded only after the checkpoint that ends it is written (`on_save`), so a resume never redoes a
    recorded epoch: a stop between the evaluation and that checkpoint redoes the epoch's last steps and records it
    once, then. The record waiting for its checkpoint travels in it, as do the seconds spent in the current epoch
    (an `ExportableState`), so an epoch interrupted and resumed counts the steps it kept plus the ones it redid, not
    the lost ones.
    """

    def __init__(self, folder: str, keep_epochs: list[int] | None = None, carried_seconds: float = 0.0,
                 pending: dict | None = None):
        self.folder = Path(folder)
        self.keep_epochs = list(keep_epochs or [])
        self.carried_seconds = carried_seconds  # of the current epoch, before this process started it
        self.pending = pending  # the last evaluated epoch's record, until its checkpoint is written
        self.started = None
        self.epoch_seconds = None

    def state(self) -> dict:
        return {"args": {"folder": str(self.folder), "keep_epochs": self.keep_epochs},
                "attributes": {"carried_seconds": self._elapsed(), "pending": self.pending}}

    def _append_pending(self):
        """Appends the pending record unless `epochs.jsonl` holds its epoch already."""
        if self.pending is not None and self.pending["epoch"] not in {e["epoch"] for e in epoch_records(self.folder)}:
            with open(self.folder / "epochs.jsonl", "a") as handle:
                handle.write(json.dumps(self.pending) + "\n")
        self.pending = None

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self._append_pending()

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:  # resumed from the last checkpoint, the stop having come before its on_save
            self._append_pending()

    def _elapsed(self) -> float:
        return self.carried_seconds + (time.perf_counter() - self.started if self.started is not None else 0.0)

    def on_epoch_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:  # resumed from a checkpoint whose on_save never came (callback states are
            self._append_pending()  # restored after on_train_begin, before the first epoch begins)
        self.started = time.perf_counter()

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        self.epoch_seconds = self._elapsed()
        self.carried_seconds, self.started = 0.0, None
        epoch = round(state.epoch)
        if state.is_world_process_zero and epoch in self.keep_epochs and model is not None:
            model.save_pretrained(self.folder / f"epoch-{epoch}")

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):  # kwargs: model, as every event's
        if not state.is_world_process_zero or self.epoch_seconds is None or "eval_perplexity" not in metrics:
            return
        record = {
            "epoch": round(state.epoch),
            "step": state.global_step,
            "validation_perplexity": metrics["eval_perplexity"],
            **({"validation_bits_per_character": metrics["eval_bits_per_character"]}
               if "eval_bits_per_character" in metrics else {}),
            **({"gradient_mode": kwargs["model"].config.gradient_mode}  # of the epoch's last step
               if kwargs.get("model") is not None else {}),
            "train_seconds": self.epoch_seconds,
            "load_average": [round(value, 2) for value in os.getloadavg()],  # 1, 5, 15 min, at the epoch's end
            "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        self.epoch_seconds = None
        self.pending = record


def epoch_records(folder: Path) -> list[dict]:
    """The records of `epochs.jsonl`, one per epoch (should an epoch appear twice, the last one wins)."""
    by_epoch = {}
    path = folder / "epochs.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                by_epoch[record["epoch"]] = record
    return [by_epoch[epoch] for epoch in sorted(by_epoch)]


def mode_record(args, mode: str) -> dict:
    """Everything finished so far in one mode: its settings, every epoch's record, and (once finished) the test
    perplexity of its best epoch. Epochs come from the run folder's `epochs.jsonl`, and from `<record>/<mode>.json`
    for any epoch the run folder no longer holds; so does the test perplexity once the folder has lost its
    `results.json`."""
    folder = Path(args.output) / mode
    earlier = {}
    if args.record and (Path(args.record) / f"{mode}.json").exists():
        earlier = json.loads((Path(args.record) / f"{mode}.json").read_text())
    by_epoch = {e["epoch"]: e for e in earlier.get("epochs", [])}
    by_epoch |= {record["epoch"]: record for record in epoch_records(folder)}
    epochs = [by_epoch[epoch] for epoch in sorted(by_epoch)]
    results_path = folder / "results.json"
    if results_path.exists():
        results = json.loads(results_path.read_text())
    elif earlier.get("finished"):  # the run folder is gone: its final measurement lives on in the record
        results = {"test_perplexity": earlier["test_perplexity_of_best"]}
    else:
        results = {}
    best = min(epochs, key=lambda record: record["validation_perplexity"]) if epochs else None
    return {
        "mode": mode,
        "config": args.config,
        "overrides": mode_overrides(args, mode) + list(args.set) + ([f"model.hidden_size={args.hidden}"] if args.hidden else []),
        "sampling": args.sampling,
        "seed": args.seed,
        "epochs_planned": args.epochs,
        "threads": args.threads,
        "epochs": epochs,
        "best_epoch": best["epoch"] if best else None,
        "best_validation_perplexity": best["validation_perplexity"] if best else None,
        "finished": bool(results),
        "test_perplexity_of_best": results.get("test_perplexity"),
        **({"test_bits_per_character_of_best": results["test_bits_per_character"]}
           if "test_bits_per_character" in results else {}),
    }


def write_record(args, mode: str) -> None:
    if args.record:
        Path(args.record).mkdir(parents=True, exist_ok=True)
        write_atomically(str(Path(args.record) / f"{mode}.json"), json.dumps(mode_record(args, mode), indent=1))


class RecordWriter(TrainerCallback):
    """Rewrites `<record>/<mode>.json` after each checkpoint (after `EpochRecorder` appended an epoch it ended)."""

    def __init__(self, args, mode: str):
        self.args, self.mode = args, mode

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            write_record(self.args, self.mode)


class SaveEvery(TrainerCallback):
    """A checkpoint every `steps` optimizer steps, besides the Trainer's at each epoch's end."""

    def __init__(self, steps: int):
        self.steps = steps

    def on_step_end(self, args, state, control, **kwargs):
        if self.steps > 0 and state.global_step % self.steps == 0:
            control.should_save = True


def mode_experiment(args, mode: str):
    """The experiment config that `args` describe for `mode`, checked against the run its folder holds: a run
    continued, put in the table or published must be the run these flags describe (refused by name otherwise)."""
    folder = Path(args.output) / mode
    overrides = [*mode_overrides(args, mode), f"training.output_dir={folder}", f"training.num_train_epochs={args.epochs}",
                 f"training.seed={args.seed}", "training.save_total_limit=2",
                 "training.restore_callback_states_from_checkpoint=true", *args.set]
    if args.sampling != "random":
        overrides.append(f"training.train_sampling_strategy={args.sampling}")
    if args.hidden:
        overrides.append(f"model.hidden_size={args.hidden}")
    if args.max_train_samples:
        overrides.append(f"data.max_train_samples={args.max_train_samples}")
    if earlier_run(str(folder)):  # continue it: from its newest intact checkpoint, or from step 0 if it has none
        overrides.append("training.resume_from_checkpoint=true")
    experiment = load_config(args.config, overrides)
    changes = settings_changed_since_start(experiment, folder)
    if changes:
        raise SystemExit(f"[{mode}] {folder} holds a run started with other settings: {'; '.join(changes)}. Run "
                         f"again with the flags it started with, or choose another --output.")
    return experiment


def mode_command(args, mode: str) -> str:
    """The command line that trains `mode` as `args` describe (what a model card quotes)."""
    flags = [f"--config {args.config}", f"--epochs {args.epochs}", f"--modes {mode}", f"--seed {args.seed}"]
    flags += [f"--sampling {args.sampling}"] if args.sampling != "random" else []
    flags += [f"--hidden {args.hidden}"] if args.hidden else []
    flags += [f"--max-train-samples {args.max_train_samples}"] if args.max_train_samples else []
    flags += [f"--threads {args.threads}"] if args.threads else []
    flags += [f"--switch-epoch {args.switch_epoch}"] if mode in SCHEDULED_RUNS else []
    flags += [f"--set {override}" for override in args.set]
    return "python examples/reproduce_ptb.py " + " ".join(flags)


def train_mode(args, mode: str) -> dict:
    folder = Path(args.output) / mode
    experiment = mode_experiment(args, mode)
    if (folder / "results.json").exists():
        print(f"[{mode}] finished earlier: {folder / 'results.json'}")
        write_record(args, mode)
        return json.loads((folder / "results.json").read_text())
    folder.mkdir(parents=True, exist_ok=True)
    print(f"[{mode}] training {args.config} for {args.epochs} epochs in {folder} ({args.sampling} batches)", flush=True)
    callbacks = [EpochRecorder(str(folder), args.keep_epochs), RecordWriter(args, mode), SaveEvery(args.save_steps)]
    _, results = run(experiment, callbacks=callbacks)
    write_record(args, mode)
    return results


def train_in_parallel(args, argv: list[str]) -> None:
    """Each mode in its own process (`--jobs` at a time), with this command's other flags."""
    def train_alone(mode):
        command = [sys.executable, __file__, *argv, "--jobs", "1", "--modes", mode, "--no-report"]
        if subprocess.run(command).returncode != 0:
            raise SystemExit(f"[{mode}] failed: {' '.join(command)}")

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        list(pool.map(train_alone, args.modes))


def quality_of(record: dict, split: str = "validation") -> float | None:
    """An epoch record's (or, with split "test", a mode record's) quality: bits per character when the data is
    character-level (the records carry it), else perplexity; lower is better."""
    if split == "test":
        return record.get("test_bits_per_character_of_best", record.get("test_perplexity_of_best"))
    return record.get("validation_bits_per_character", record["validation_perplexity"])


def gap_closed(value: float | None, bptt: float | None, ft_bptt: float | None) -> float | None:
    """How much of the FT-BPTT-to-BPTT gap a run closes: (FT-BPTT - value) / (FT-BPTT - BPTT); 1 is BPTT's quality,
    0 FT-BPTT's (the same measure, e.g. test perplexity, for all three)."""
    if None in (value, bptt, ft_bptt) or ft_bptt == bptt:
        return None
    return (ft_bptt - value) / (ft_bptt - bptt)


def collect(args, mode: str) -> dict:
    record = mode_record(args, mode)
    seconds = [epoch["train_seconds"] for epoch in record["epochs"]]
    best = min(record["epochs"], key=quality_of) if record["epochs"] else None
    return {
        "mode": mode,
        "steps": [epoch["step"] for epoch in record["epochs"]],
        "gradient_modes": [epoch.get("gradient_mode", RUNS[mode][0].split("=")[1]) for epoch in record["epochs"]],
        "validation_quality": [quality_of(epoch) for epoch in record["epochs"]],
        "best_validation_quality": quality_of(best) if best else None,
        "test_quality_of_best": quality_of(record, "test"),
        "sampling": record["sampling"],
        "epochs": [epoch["epoch"] for epoch in record["epochs"]],
        "validation_perplexity": [epoch["validation_perplexity"] for epoch in record["epochs"]],
        "train_seconds": seconds,
        "best_validation_perplexity": record["best_validation_perplexity"],
        "best_epoch": record["best_epoch"],
        "epochs_reached": max((epoch["epoch"] for epoch in record["epochs"]), default=0),
        "seconds_per_epoch": sum(seconds) / len(seconds) if seconds else None,
        "test_perplexity_of_best": record["test_perplexity_of_best"],
    }


def character_level(rows: list[dict]) -> bool:
    return any(row["validation_quality"] != row["validation_perplexity"] for row in rows)


def with_gap_closed(rows: list[dict]) -> tuple[list[dict], str]:
    """Each row with `gap_closed` (of the FT-BPTT-to-BPTT gap), measured on the test value of the best epoch once
    bptt and ft_bptt have one, else on the best validation value; and the name of the measure used."""
    by_mode = {row["mode"]: row for row in rows}
    key = "test_quality_of_best"
    if any(by_mode.get(mode, {}).get(key) is None for mode in ("bptt", "ft_bptt")):
        key = "best_validation_quality"
    ends = [by_mode.get(mode, {}).get(key) for mode in ("bptt", "ft_bptt")]
    rows = [row | {"gap_closed": gap_closed(row[key], *ends)} for row in rows]
    return rows, key


def write_table(args, rows: list[dict]) -> str:
    chars = character_level(rows)
    rows, measure = with_gap_closed(rows)
    unit = "bits per character" if chars else "perplexity"
    data = "PTB character level (the standard PTB-char text)" if chars else "PTB sentence level"
    lines = [
        f"{data}, `{args.config}`{f' with hidden_size={args.hidden}' if args.hidden else ''}, "
        f"{args.epochs} epochs, seed {args.seed}, {args.sampling} batches"
        + (f", dsf_then_bptt: DSF for {args.switch_epoch} epochs, then BPTT" if args.switch_epoch else "") + ".",
        f"Gap closed: (FT-BPTT - mode) / (FT-BPTT - BPTT) of the {'test' if measure.startswith('test') else 'best validation'} "
        f"{unit}.",
        "",
        f"| mode | best validation {unit} | at epoch | epochs run | seconds / epoch | test {unit} (best) | gap closed |",
        "|---|---|---|---|---|---|---|",
    ]
    def number(value, digits, missing="-"):
        return missing if value is None else f"{value:.{digits}f}"

    digits = 4 if chars else 2
    for row in rows:
        closed = "-" if row["gap_closed"] is None else f"{row['gap_closed']:.0%}"
        lines.append(f"| {row['mode']} | {number(row['best_validation_quality'], digits)} | {row['best_epoch'] or '-'} | "
                     f"{row['epochs_reached']} | {number(row['seconds_per_epoch'], 0)} | "
                     f"{number(row['test_quality_of_best'], digits, 'at the end')} | {closed} |")
    return "\n".join(lines) + "\n"


def step_seconds(cost: dict) -> dict[str, float]:
    """`{gradient mode: median seconds of a training step}` from a `benchmarks/train_step.py --json` report."""
    return {run["mode"]: run["median_s"] for run in cost["runs"] if run["dtype"] == "float32"}


def costed(row: dict, seconds: dict) -> bool:
    """Whether the step time of every epoch of `row` was measured: the cost runs measure the paper's modes, so the
    paper's runs and the schedules between them (not dsf_calibrated, whose step also gathers statistics)."""
    return len(RUNS[row["mode"]]) == 1 and all(mode in seconds for mode in row["gradient_modes"])


def cumulative_cost(row: dict, seconds: dict) -> list[float]:
    """Training cost at the end of each epoch: the steps each epoch took, each at the measured step time of the
    gradient mode that epoch trained with (a scheduled run pays DSF's price, then BPTT's)."""
    total, costs, previous = 0.0, [], 0
    for step, mode in zip(row["steps"], row["gradient_modes"]):
        total += (step - previous) * seconds[mode]
        costs.append(total)
        previous = step
    return costs


def targets_table(rows: list[dict], seconds: dict, unit: str) -> str:
    """For each target quality (the best validation value each of bptt, dsf, ft_bptt reached): the training cost
    (steps x measured step time) at which each run first reached it, and which run got there first, by how much."""
    rows = [row for row in rows if costed(row, seconds)]
    costs = {row["mode"]: cumulative_cost(row, seconds) for row in rows}
    head = (f"| target: validation {unit} of | value | " + " | ".join(row["mode"] for row in rows)
            + " | first |\n|---|---|" + "---|" * (len(rows) + 1))
    lines = [head]
    for reference in ("ft_bptt", "dsf", "bptt"):
        source = next((row for row in rows if row["mode"] == reference), None)
        if source is None or source["best_validation_quality"] is None:
            continue
        target = source["best_validation_quality"]
        reached = {}
        for row in rows:
            hit = next((i for i, value in enumerate(row["validation_quality"]) if value <= target), None)
            reached[row["mode"]] = None if hit is None else (costs[row["mode"]][hit], row["epochs"][hit])
        cells = [f"{value[0] / 3600:.2f} h (epoch {value[1]})" if value else "not reached"
                 for value in reached.values()]
        ranked = sorted((value[0], mode) for mode, value in reached.items() if value)
        first = ranked[0][1] + (f", {ranked[1][0] / ranked[0][0]:.2f}x cheaper than {ranked[1][1]}"
                                if len(ranked) > 1 else "")
        lines.append(f"| {reference}'s best | {target:.4g} | " + " | ".join(cells) + f" | {first} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, seconds: dict | None = None) -> None:
    """Validation quality against epochs and the training wall clock; with measured step `seconds`, also against
    the training cost (steps x step time of each epoch's gradient mode)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    unit = "bits per character" if character_level(rows) else "perplexity"
    figure, axes = plt.subplots(1, 3 if seconds else 2, figsize=(16.5 if seconds else 11, 4.2))
    by_epoch, by_time = axes[0], axes[1]
    for row in rows:
        by_epoch.plot(row["epochs"], row["validation_quality"], marker="o", label=row["mode"])
        elapsed, total = [], 0.0
        for epoch_seconds in row["train_seconds"]:
            total += epoch_seconds
            elapsed.append(total)
        by_time.plot(elapsed, row["validation_quality"], marker="o", label=row["mode"])
        if seconds and costed(row, seconds):
            axes[2].plot([c / 3600 for c in cumulative_cost(row, seconds)], row["validation_quality"], marker="o",
                         label=row["mode"])
    by_epoch.set_xlabel("epoch")
    by_time.set_xlabel("training wall-clock (s, as the runs went, machine shared)")
    if seconds:
        axes[2].set_xlabel("training cost (h): steps x measured step time")
    for axis in axes:
        axis.set_ylabel(f"validation {unit}")
        axis.set_yscale("linear" if unit != "perplexity" else "log")
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


RESULTS_BLOCK = ("<!-- reproduce_ptb: per-epoch tables, written by --report-only --results-doc -->",
                 "<!-- reproduce_ptb: end -->")
COST_BLOCK = ("<!-- reproduce_ptb {name}: cost, written by --report-only --results-doc --cost -->",
              "<!-- reproduce_ptb {name}: cost end -->")
FIDELITY_BLOCK = ("<!-- reproduce_ptb: fidelity table, written by --report-only --results-doc -->",
                  "<!-- reproduce_ptb: fidelity end -->")
# The fidelity table's columns: the gradients compared with the exact one, in the fidelity command's names.
FIDELITY_COLUMNS = {"ft_bptt": "FT-BPTT", "dsf": "DSF (model's a)", "dsf_calibrated": "DSF, calibrated a",
                    "diag_jacobian": "diag_jacobian"}


def epoch_tables(args) -> str:
    """Validation perplexity, and training seconds with the 1-minute load average, per epoch (rows) and mode."""
    records = {mode: {e["epoch"]: e for e in mode_record(args, mode)["epochs"]} for mode in args.modes}
    last = max((max(r, default=0) for r in records.values()), default=0)
    head = "| epoch | " + " | ".join(args.modes) + " |\n|---|" + "---|" * len(args.modes)
    perplexity, seconds = [head], [head]
    chars = any("validation_bits_per_character" in e for r in records.values() for e in r.values())
    for epoch in range(1, last + 1):
        cells = [records[m].get(epoch) for m in args.modes]
        perplexity.append(f"| {epoch} | " + " | ".join(
            (f"{quality_of(c):.4f}" if chars else f"{c['validation_perplexity']:.2f}")
            + (f" ({c['gradient_mode']})" if c and m in SCHEDULED_RUNS else "") if c else ""
            for m, c in zip(args.modes, cells)) + " |")
        seconds.append(f"| {epoch} | " + " | ".join(
            f"{c['train_seconds']:.0f} (load {c['load_average'][0]:.1f})" if c else "" for c in cells) + " |")
    return (f"Validation {'bits per character' if chars else 'perplexity'} after each epoch:\n\n" + "\n".join(perplexity)
            + "\n\nTraining seconds of each epoch (1-minute load average of the 2-core machine at its end):\n\n"
            + "\n".join(seconds) + "\n")


def fidelity_files(folder: Path, modes: list[str]) -> list[tuple[str, int, Path]]:
    """`(mode, epoch, path)` of each `<folder>/<mode>_epoch<e>.json`, by mode (in `modes` order), then epoch."""
    found = []
    for mode in modes:
        for path in folder.glob(f"{mode}_epoch*.json"):
            epoch = path.stem[len(f"{mode}_epoch"):]
            if epoch.isdigit():
                found.append((mode, int(epoch), path))
    return sorted(found, key=lambda item: (modes.index(item[0]), item[1]))


def fidelity_table(folder: Path, modes: list[str]) -> str:
    """One row per fidelity JSON (a model, after an epoch): for each approximate gradient, its cosine to the exact
    one on `weight_ih` / `weight_hh` and the norm ratio of layer 0's whole gradient; then the correlation between the
    model's feedback `a` and the units' measured memory."""
    head = ("| model trained with | epoch | " + " | ".join(FIDELITY_COLUMNS.values()) + " | corr(a, memory) |\n"
            "|---|---|" + "---|" * (len(FIDELITY_COLUMNS) + 1))
    rows = [head]
    for mode, epoch, path in fidelity_files(folder, modes):
        report = json.loads(path.read_text())
        cells = []
        for gradient in FIDELITY_COLUMNS:
            parameters = report["parameters"].get(gradient)
            if parameters is None:
                cells.append("")
                continue
            ih, hh = (parameters[f"model.layers.0.recurrent.{name}"]["cosine"] for name in ("weight_ih", "weight_hh"))
            cells.append(f"{ih:.3f} / {hh:.3f} ({report['layers'][gradient]['layers.0']['norm_ratio']:.2f})")
        correlation = report["feedback_match"]["layers.0"]["correlation"]
        rows.append(f"| {mode} | {epoch} | " + " | ".join(cells) + f" | {correlation:.2f} |")
    return "\n".join(rows) + "\n"


def replace_block(text: str, markers: tuple[str, str], content: str) -> str:
    start, end = (text.index(marker) for marker in markers)
    return text[:start] + f"{markers[0]}\n{content}" + text[end:]


def write_results_doc(args, rows: list[dict]) -> None:
    """Replace the blocks between the `RESULTS_BLOCK` (and, if present, `FIDELITY_BLOCK`) markers of
    `args.results_doc` by the tables of this run."""
    path = Path(args.results_doc)
    markers = tuple(marker.format(name=args.block) for marker in COST_BLOCK) if args.block else RESULTS_BLOCK
    text = replace_block(path.read_text(), markers, f"{write_table(args, rows)}\n{epoch_tables(args)}"
                         + (f"\n{cost_section(args, rows)}" if args.cost else ""))
    if FIDELITY_BLOCK[0] in text:
        text = replace_block(text, FIDELITY_BLOCK, fidelity_table(Path(args.record or args.output) / "fidelity",
                                                                  list(RUNS)))
    write_atomically(str(path), text)


def cost_section(args, rows: list[dict]) -> str:
    """The measured step cost of every mode (`--cost`, a `benchmarks/train_step.py --json` report) and, from it, when
    each run reached the best validation quality of bptt, dsf and ft_bptt."""
    cost = json.loads(Path(args.cost).read_text())
    seconds, model = step_seconds(cost), cost["model"]
    lines = [f"Step cost ({cost['machine']}; {model['layers']} x {model['hidden']} {model['cell']}, vocab "
             f"{model['vocab']}, batch {model['batch']}, length {model['length']}, {model['threads']} thread(s), "
             f"median of {model['repeats']} interleaved repeats; {cost['load']}):", "",
             "| mode | ms / step | peak memory (MiB) | BPTT / mode (paired) |", "|---|---|---|---|"]
    for run in cost["runs"]:
        if run["dtype"] == "float32":
            ratio = run["paired_bptt_over_mode"]
            lines.append(f"| {run['mode']} | {run['median_s'] * 1000:.0f} | {run['peak_memory_mib']:.0f} | "
                         + ("-" if ratio is None else f"{ratio:.2f}x") + " |")
    unit = "bits per character" if character_level(rows) else "perplexity"
    return ("\n".join(lines) + "\n\nTraining cost (steps x the step time above) at which each run first reached "
            "a target:\n\n" + targets_table(rows, seconds, unit))


def export_mode(args, mode: str, experiment) -> Path:
    """The best model of a finished `mode` (trained as `experiment`, `mode_experiment`) as a Hub folder
    `<export_to>/<name>` (`sfrnn_hf.training.export`), its card stating the protocol and the validation and test
    perplexity `sfrnn_hf.training.train.run` measured on it; a copy of the card in `<cards>/<name>.md`. Returns the
    folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sfrnn_hf.training.export import export_for_hub, recorded_perplexities

    folder, record = Path(args.output) / mode, mode_record(args, mode)
    if not (folder / "results.json").exists():
        raise SystemExit(f"[{mode}] not finished (no {folder / 'results.json'}): nothing to export.")
    model, tokenizer = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder / "tokenizer")
    training, trainer_args, config = experiment.training, experiment.trainer_args, model.config
    name = f"sfrnn-{config.cell_type}-{config.num_hidden_layers}x{config.hidden_size}-ptb-{mode}"
    epochs = trainer_args["num_train_epochs"]
    measured = recorded_perplexities(folder)
    sampling = {"random": "drawn uniformly at random (the paper's protocol)",
                "group_by_length": "grouped by length (not the paper's protocol)"}[record["sampling"]]
    details = {
        "training run": f"`{mode}`: {', '.join(f'`{o}`' for o in RUNS[mode])}",
        "batches": f"{training.batch_size} sentences {sampling}, one sentence a sequence (`<bos> ... <eos>`, at most "
                   f"{experiment.data.max_length} tokens)",
        "optimizer": f"Adam, lr {trainer_args['learning_rate']:g}, coupled weight decay "
                     f"{trainer_args.get('weight_decay', 0.0):g}, " + (
                         "no clipping" if trainer_args["max_grad_norm"] == 0
                         else f"gradient norm clipped at {trainer_args['max_grad_norm']:g}"),
        "schedule": f"{epochs:g} epochs, StepLR x{training.step_gamma:g} every {training.step_every * epochs:.3g} epochs",
        "seed": str(record["seed"]),
        "model kept": f"the best validation epoch, {record['best_epoch']} of {epochs:g}",
    }
    exported = export_for_hub(  # the card names the folder as it is addressed from the repository's root
        model, tokenizer, Path(args.export_to) / name, repo_id=str(Path(args.export_to) / name), datasets=["ptb_text_only"], perplexity=measured.get("validation"),
        test_perplexity=measured.get("test"), eval_command=mode_command(args, mode),
        data_description=f"Penn Treebank, word level ({len(tokenizer):,} tokens, the special ones included), the "
                         "standard train split",
        training_details=details)
    if args.cards:
        Path(args.cards).mkdir(parents=True, exist_ok=True)
        write_atomically(str(Path(args.cards) / f"{name}.md"), (exported / "README.md").read_text())
    print(f"[{mode}] exported to {exported}")
    return exported


def report(args) -> None:
    # flags that describe another run than a folder holds: refused before anything is written
    experiments = {mode: mode_experiment(args, mode) for mode in args.modes}
    rows = [collect(args, mode) for mode in args.modes]
    output = Path(args.record or args.output)
    output.mkdir(parents=True, exist_ok=True)
    write_atomically(str(output / "results.json"), json.dumps(
        {"config": args.config, "epochs": args.epochs, "hidden": args.hidden, "sampling": args.sampling,
         "runs": rows}, indent=2, allow_nan=False))
    table = write_table(args, rows)
    write_atomically(str(output / "results.md"), table)
    plot(rows, output / "perplexity.png", step_seconds(json.loads(Path(args.cost).read_text())) if args.cost else None)
    if args.results_doc:
        write_results_doc(args, rows)
    if args.export_to:
        for mode in args.modes:
            export_mode(args, mode, experiments[mode])
    print(table)
    print(f"wrote {output / 'results.md'}, {output / 'results.json'}, {output / 'perplexity.png'}")


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="ptb_gru_1x256", help="a shipped PTB config (or a YAML path)")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--hidden", type=int, help="override the config's hidden_size")
    parser.add_argument("--modes", nargs="+", default=list(PAPER_RUNS), choices=list(RUNS),
                        help="runs to train (default: the paper's three; add dsf_calibrated and diag_jacobian)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--switch-epoch", type=int,
                        help="dsf_then_bptt: the epochs trained with DSF before exact BPTT takes over")
    parser.add_argument("--sampling", choices=SAMPLINGS, default="random",
                        help="random: 128 sentences drawn uniformly (the paper's protocol); group_by_length: "
                             "sentences of similar length together (transformers' LengthGroupedSampler; PTB: 3%% "
                             "padding instead of 59%%, and a different result)")
    parser.add_argument("--max-train-samples", type=int, help="train on the first N sentences (smoke tests)")
    parser.add_argument("--set", action="append", default=[], metavar="section.key=value", help="config override")
    parser.add_argument("--output", default="runs/reproduce_ptb")
    parser.add_argument("--record", help="folder for `<mode>.json` (rewritten after every epoch) and the table")
    parser.add_argument("--save-steps", type=int, default=50, help="a checkpoint every N steps (0: epoch ends only)")
    parser.add_argument("--keep-epochs", type=int, nargs="*", default=[1, 10, 30],
                        help="keep the model after these epochs in <mode>/epoch-<e>/ (fidelity)")
    parser.add_argument("--jobs", type=int, default=1, help="modes trained at once, each in its own process")
    parser.add_argument("--threads", type=int, help="torch CPU threads per process (default: torch's)")
    parser.add_argument("--report-only", action="store_true", help="write the table and figure from what exists")
    parser.add_argument("--results-doc", help="a Markdown file whose reproduce_ptb blocks get the tables")
    parser.add_argument("--export-to", help="write each mode's best model as a Hub folder here (modes must be finished)")
    parser.add_argument("--cards", help="with --export-to: keep a copy of each model card here (`<name>.md`)")
    parser.add_argument("--cost", help="a `benchmarks/train_step.py --json` report of this model: quality against "
                        "training cost in the figure and --results-doc")
    parser.add_argument("--block", help="with --results-doc: write the `reproduce_ptb <block>` marked section "
                        "(tables, and the cost with --cost) instead of the protocol's")
    parser.add_argument("--no-report", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    if not args.report_only:
        if args.jobs > 1 and len(args.modes) > 1:
            train_in_parallel(args, argv)
        else:
            for mode in args.modes:
                train_mode(args, mode)
    if not args.no_report:
        report(args)


if __name__ == "__main__":
    main()
