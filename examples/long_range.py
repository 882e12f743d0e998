"""Long-range credit: does each gradient mode learn a dependency T steps back?

Two synthetic tasks, trained through `SfrnnForSequenceClassification` (a linear head on the last state):

- delayed recall: a key token (one of K) at t = 0, then distractor tokens, then a query token at t = T - 1; the label
  is the key, read at the query (the only position the loss sees). Chance: 1/K.
- adding problem: T (value, marker) pairs given as `inputs_embeds`, values uniform in [0, 1], two markers (one in each
  half); the label is the sum of the two marked values (regression, MSE). The trivial predictor (always 1, the mean
  sum) has an MSE of 1/6.

Every gradient mode of `reproduce_ptb.RUNS` (`bptt`, `dsf`, `ft_bptt`, `dsf_calibrated`, `diag_jacobian`) trains from
the same initial weights on the same batches, and is evaluated on the same held-out sequences:

    python examples/long_range.py                       # the whole grid, then the table in docs/results.md
    python examples/long_range.py --tasks recall --cells gru --lengths 50 --modes bptt dsf   # a part of it
    python examples/long_range.py --report-only         # the table from the committed JSON only

One JSON a setting in `--output` (`<task>_<cell>_T<length>_<mode>.json`): a setting whose JSON exists is skipped, so
an interrupted grid continues where it stopped. Each JSON also says which state units carry the long-range
information at the end (`carriers`) and the feedback and memory (mean diag(J)) those units have.
"""

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from sfrnn_hf import SfrnnConfig, SfrnnForSequenceClassification
from sfrnn_hf.recurrent_sfrnn import mean_diagonal_jacobian
from sfrnn_hf.training.checkpoints import write_atomically

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reproduce_ptb import RUNS, replace_block  # noqa: E402  (the mode names and their config overrides)

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("recall", "adding")
KEYS, DISTRACTORS = 4, 8  # delayed recall: vocabulary = keys, distractors, one query token
ADDING_BASELINE_MSE = 1 / 6  # the variance of the sum of two U[0, 1] values: the MSE of always predicting 1
RESULTS_BLOCK = ("<!-- long_range: table, written by examples/long_range.py -->", "<!-- long_range: end -->")


def mode_overrides(mode: str) -> dict:
    """`{"gradient_mode": ..., ...}` from `reproduce_ptb.RUNS[mode]` (`model.<field>=<value>` strings)."""
    return dict(item.removeprefix("model.").split("=", 1) for item in RUNS[mode])


def recall_batch(generator: torch.Generator, batch: int, length: int) -> dict:
    """input_ids `(batch, length)`: a key in [0, KEYS) at t = 0, distractors, the query token at t = length - 1;
    labels `(batch,)`: the key."""
    keys = torch.randint(0, KEYS, (batch,), generator=generator)
    input_ids = torch.randint(KEYS, KEYS + DISTRACTORS, (batch, length), generator=generator)
    input_ids[:, 0], input_ids[:, -1] = keys, KEYS + DISTRACTORS
    return {"input_ids": input_ids, "labels": keys}


def adding_batch(generator: torch.Generator, batch: int, length: int, width: int) -> dict:
    """inputs_embeds `(batch, length, width)`: channel 0 the values, channel 1 the two markers (one in each half),
    the other channels 0; labels `(batch,)`: the sum of the marked values. `far` `(batch,)`: the first marked value."""
    values = torch.rand(batch, length, generator=generator)
    half = length // 2
    first = torch.randint(0, half, (batch,), generator=generator)
    second = torch.randint(half, length, (batch,), generator=generator)
    rows = torch.arange(batch)
    markers = torch.zeros(batch, length)
    markers[rows, first] = markers[rows, second] = 1.0
    inputs_embeds = torch.zeros(batch, length, width)
    inputs_embeds[..., 0], inputs_embeds[..., 1] = values, markers
    return {"inputs_embeds": inputs_embeds, "labels": values[rows, first] + values[rows, second],
            "far": values[rows, first]}


def make_batch(task: str, generator: torch.Generator, batch: int, length: int, width: int) -> dict:
    if task == "recall":
        return recall_batch(generator, batch, length)
    if task == "adding":
        return adding_batch(generator, batch, length, width)
    raise ValueError(f"task must be one of {list(TASKS)}, got {task!r}.")


def build_model(task: str, cell: str, mode: str, width: int, seed: int) -> SfrnnForSequenceClassification:
    """One residual layer of `width`; the same initial weights for every mode (`seed`)."""
    recall = task == "recall"
    config = SfrnnConfig(vocab_size=KEYS + DISTRACTORS + 1, hidden_size=width, num_hidden_layers=1, cell_type=cell,
                         num_labels=KEYS if recall else 1,
                         problem_type="single_label_classification" if recall else "regression",
                         **mode_overrides(mode))
    torch.manual_seed(seed)
    return SfrnnForSequenceClassification(config)


def model_inputs(batch: dict, labels: bool = False) -> dict:
    """The keyword arguments of the model's forward in a task's batch (`far` is for the analysis only)."""
    keys = ("input_ids", "inputs_embeds", "labels") if labels else ("input_ids", "inputs_embeds")
    return {key: batch[key] for key in keys if key in batch}


def final_states(model, batch: dict) -> torch.Tensor:
    """The layer's state after the last step `(batch, S)` (the LSTM's `[h, c]`), without grad."""
    with torch.no_grad():
        return model.model(**model_inputs(batch), use_cache=True).past_key_values.get_state(0)


def explained_share(states: torch.Tensor, target: torch.Tensor, classes: bool) -> torch.Tensor:
    """Per state unit `(S,)`, the share of its variance over the batch that `target` `(batch,)` explains: the
    between-class share for class labels, the squared correlation for a real value."""
    centred = states - states.mean(dim=0)
    total = centred.pow(2).mean(dim=0).clamp(min=1e-12)
    if classes:
        means = torch.stack([states[target == k].mean(dim=0) for k in target.unique()])
        counts = torch.stack([(target == k).sum() for k in target.unique()]).to(states)
        between = (counts[:, None] * (means - states.mean(dim=0)).pow(2)).sum(dim=0) / counts.sum()
        return between / total
    target = (target - target.mean()) / target.std().clamp(min=1e-12)
    return (centred * target[:, None]).mean(dim=0).pow(2) / total


def carriers(model, task: str, evaluation: dict) -> dict:
    """Per state unit `(S,)` lists: `share`, how much of its final value over the held-out sequences the far
    information explains (the key; the first marked value); `memory`, its mean diag(J_t) over those sequences; and
    `feedback`, the DSF diagonal `a` it gets (used by `dsf` only)."""
    layer = model.model.layers[0].recurrent
    states = final_states(model, evaluation)
    share = explained_share(states, evaluation["labels"] if task == "recall" else evaluation["far"],
                            classes=task == "recall")
    inputs = evaluation.get("inputs_embeds")
    if inputs is None:
        inputs = model.model.embeddings(evaluation["input_ids"]).detach()
    memory = mean_diagonal_jacobian(layer, inputs)
    return {"share": share.tolist(), "memory": memory.tolist(), "feedback": layer.feedback.tolist()}


def evaluate(model, task: str, evaluation: dict) -> float:
    """Accuracy (recall) or mean squared error (adding) on the held-out sequences."""
    with torch.no_grad():
        logits = model.eval()(**model_inputs(evaluation)).logits
    model.train()
    if task == "recall":
        return (logits.argmax(-1) == evaluation["labels"]).float().mean().item()
    return F.mse_loss(logits.squeeze(-1), evaluation["labels"]).item()


def train_setting(task: str, cell: str, length: int, mode: str, width: int = 32, steps: int = 400, batch: int = 64,
                  learning_rate: float = 1e-2, eval_size: int = 512, seed: int = 0, log_every: int = 25) -> dict:
    """Train one (task, cell, length, mode) from `seed`: Adam, gradient norm clipped at 1, a calibrated feedback
    moved after each optimizer step. The batches depend only on `seed` and `length`, the held-out set on `seed + 1`:
    the same for every mode. Returns the record written as JSON."""
    model = build_model(task, cell, mode, width, seed).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
    batches = torch.Generator().manual_seed(seed)
    evaluation = make_batch(task, torch.Generator().manual_seed(seed + 1), eval_size, length, width)
    losses, started = [], time.perf_counter()
    for step in range(1, steps + 1):
        loss = model(**model_inputs(make_batch(task, batches, batch, length, width), labels=True)).loss
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"{task} {cell} T={length} {mode}: loss {loss.item()} at step {step}.")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        model.update_calibrated_feedback()  # a no-op unless gradient_mode="dsf_calibrated"
        if step % log_every == 0 or step == steps:
            losses.append([step, loss.item()])
    seconds = time.perf_counter() - started
    metric = evaluate(model, task, evaluation)
    return {"task": task, "cell": cell, "length": length, "mode": mode, "width": width, "steps": steps,
            "batch": batch, "learning_rate": learning_rate, "seed": seed, "eval_size": eval_size,
            "metric": "accuracy" if task == "recall" else "mse", "value": metric,
            "chance": 1 / KEYS if task == "recall" else ADDING_BASELINE_MSE,
            "train_loss": losses, "train_seconds": seconds, "load_average": os.getloadavg()[0],
            "threads": torch.get_num_threads(), "carriers": carriers(model, task, evaluation)}


def record_path(output: Path, task: str, cell: str, length: int, mode: str) -> Path:
    return output / f"{task}_{cell}_T{length}_{mode}.json"


def table(records: list[dict], modes: list[str]) -> str:
    """One Markdown table per task: a row per (cell, mode), a column per length."""
    parts = []
    for task in TASKS:
        rows = [r for r in records if r["task"] == task]
        if not rows:
            continue
        lengths = sorted({r["length"] for r in rows})
        cells = [c for c in ("gru", "lstm", "rnn", "mingru") if any(r["cell"] == c for r in rows)]
        found = {(r["cell"], r["mode"], r["length"]): r for r in rows}
        first = rows[0]
        what = (f"accuracy on {first['eval_size']} held-out sequences (chance {1 / KEYS:.2f})" if task == "recall"
                else f"MSE on {first['eval_size']} held-out sequences (trivial predictor {ADDING_BASELINE_MSE:.3f})")
        parts.append(f"**{task}**: {what}; width {first['width']}, {first['steps']} steps of {first['batch']}.\n")
        parts.append("| cell | mode | " + " | ".join(f"T = {n}" for n in lengths) + " |")
        parts.append("|---|---|" + "---|" * len(lengths))
        for cell in cells:
            for mode in modes:
                values = [found.get((cell, mode, n)) for n in lengths]
                parts.append(f"| {cell} | {mode} | " + " | ".join(
                    "" if r is None else (f"{r['value']:.2f}" if task == "recall" else f"{r['value']:.3f}")
                    for r in values) + " |")
        parts.append("")
    lengths = sorted({r["length"] for r in records})
    seconds = {n: sum(r["train_seconds"] for r in records if r["length"] == n) for n in lengths}
    parts.append("Training seconds, all settings of a length summed (see each JSON's `load_average`): "
                 + ", ".join(f"T = {n}: {s:.0f} s" for n, s in seconds.items()) + ".\n")
    return "\n".join(parts)


def carrier_summary(record: dict) -> dict:
    """From a record's per-unit lists: how many units carry the far information (share >= 0.5), the memory and
    feedback `a` of the best carrier, the layer's mean memory, and how many units have a memory of 0.9 or more."""
    c = record["carriers"]
    best = max(range(len(c["share"])), key=c["share"].__getitem__)
    return {"carriers": sum(s >= 0.5 for s in c["share"]), "best_share": c["share"][best],
            "best_memory": c["memory"][best], "best_feedback": c["feedback"][best],
            "mean_memory": sum(c["memory"]) / len(c["memory"]), "long_memory": sum(m >= 0.9 for m in c["memory"]),
            "mean_feedback": sum(c["feedback"]) / len(c["feedback"])}


def carriers_table(records: list[dict], modes: list[str]) -> str:
    """A row per setting: the units that carry the far information at the end, their memory, and the feedback."""
    rows = ["At the end of training (`carriers` in each JSON), per state unit: its *share*, the part of its final "
            "value (after the query; after the last value) that the far information (the key; the first marked value) "
            "explains; its *memory*, its mean diag(J_t) over the held-out sequences; its DSF feedback *a* (`dsf` modes "
            "only).\n",
            "| task | cell | T | mode | units with share >= 0.5 | best unit: share / memory / a | units with memory "
            ">= 0.9 | mean memory | mean a |", "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(records, key=lambda r: (TASKS.index(r["task"]), r["cell"], r["length"], modes.index(r["mode"]))):
        s = carrier_summary(r)
        uses_a = mode_overrides(r["mode"])["gradient_mode"] == "dsf"
        a_best, a_mean = (f"{s['best_feedback']:.2f}", f"{s['mean_feedback']:.2f}") if uses_a else ("-", "-")
        rows.append(f"| {r['task']} | {r['cell']} | {r['length']} | {r['mode']} | {s['carriers']} | "
                    f"{s['best_share']:.2f} / {s['best_memory']:.2f} / {a_best} | {s['long_memory']} | "
                    f"{s['mean_memory']:.2f} | {a_mean} |")
    return "\n".join(rows) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--cells", nargs="+", default=["gru", "lstm"], choices=["gru", "lstm", "rnn", "mingru"])
    parser.add_argument("--lengths", nargs="+", type=int, default=[50, 200, 1000])
    parser.add_argument("--modes", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", default=str(ROOT / "docs" / "figures" / "long_range"))
    parser.add_argument("--results-doc", default=str(ROOT / "docs" / "results.md"),
                        help="rewrite the long_range block of this file ('' to skip)")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args(argv)
    for length in args.lengths:
        if length < 4:
            raise SystemExit(f"--lengths: each length must be at least 4, got {length}.")
    torch.set_num_threads(args.threads)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    # Shortest lengths first: an interrupted grid has the cheap settings of every task, cell and mode.
    settings = [(task, cell, length, mode) for length in sorted(args.lengths) for task in args.tasks
                for cell in args.cells for mode in args.modes]
    if not args.report_only:
        for task, cell, length, mode in settings:
            path = record_path(output, task, cell, length, mode)
            if path.exists():
                continue
            record = train_setting(task, cell, length, mode, width=args.width, steps=args.steps, batch=args.batch,
                                   learning_rate=args.learning_rate, seed=args.seed)
            write_atomically(str(path), json.dumps(record, indent=1))
            print(f"{task} {cell} T={length} {mode}: {record['metric']} {record['value']:.3f} "
                  f"({record['train_seconds']:.0f} s)", flush=True)
    records = [json.loads(p.read_text()) for p in sorted(output.glob("*.json"))]
    records = [r for r in records if r["mode"] in args.modes]
    report = table(records, args.modes)
    print(report)
    if args.results_doc:
        doc = Path(args.results_doc)
        text = doc.read_text()
        if RESULTS_BLOCK[0] in text:
            block = f"{report}\n{carriers_table(records, args.modes)}"
            write_atomically(str(doc), replace_block(text, RESULTS_BLOCK, block))


if __name__ == "__main__":
    main()
