"""Gradient fidelity: how close the DSF (and FT-BPTT) gradients are to the exact BPTT gradient of the same model on
the same batches. The budget-independent measure of how well DSF approximates BPTT.

- `gradient_fidelity`: cosine similarity and norm ratio to BPTT, per parameter tensor and per layer, for any gradient
  mode, and for `dsf_calibrated`: DSF with each layer's feedback set to this batch's mean diag(J_t) (what a
  calibrated feedback with momentum 0 holds after the batch).
- `feedback_match`: the model's feedback `a` against each unit's measured memory (mean diag(J_t)).
- `state_gradient_fidelity`: the state gradient split by time distance. The exact gradient at `h_t` is
  `g_t = sum_k e_{t+k} J_{t+k} ... J_{t+1}` and DSF's is `sum_k a^k e_{t+k}`: compared term by term for each distance
  `k`, and in total.

    python -m sfrnn_hf.training.fidelity runs/reproduce_ptb/dsf/early --batches 3 --out fidelity-early.json --plot early.png
"""

import argparse
import contextlib
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from ..cells_sfrnn import cell_step
from ..recurrent_sfrnn import SfrnnRecurrentLayer, mean_diagonal_jacobian, run_recurrence
from ..scan_sfrnn import reverse_diagonal_scan


def cosine_similarity(approximate: torch.Tensor, exact: torch.Tensor) -> float:
    return F.cosine_similarity(approximate.flatten().double(), exact.flatten().double(), dim=0, eps=1e-30).item()


def norm_ratio(approximate: torch.Tensor, exact: torch.Tensor) -> float:
    """`||approximate|| / ||exact||` (nan when the exact gradient is zero)."""
    exact_norm = exact.double().norm().item()
    return approximate.double().norm().item() / exact_norm if exact_norm > 0 else math.nan


# DSF with the feedback calibrated on the batch itself (no gradient mode of its own: a feedback choice).
CALIBRATED = "dsf_calibrated"


def layer_inputs(model, batch: dict) -> list[tuple]:
    """What every recurrent layer receives on `batch` (a no-grad forward): `(hidden_states, initial_state, mask)`
    per layer, in model order."""
    layers = [m for m in model.modules() if isinstance(m, SfrnnRecurrentLayer)]
    seen = [None] * len(layers)

    def keep(index):
        def hook(module, args, kwargs):
            named = dict(zip(("hidden_states", "initial_state", "mask"), args)) | kwargs
            seen[index] = (named["hidden_states"], named.get("initial_state"), named.get("mask"))
        return hook

    handles = [layer.register_forward_pre_hook(keep(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            model(**{key: value for key, value in batch.items() if key != "labels"})
    finally:
        for handle in handles:
            handle.remove()
    return seen


@contextlib.contextmanager
def calibrated_on(model, batch: dict):
    """Within the block, every recurrent layer's feedback is its mean diag(J_t) over `batch`'s real steps
    (`mean_diagonal_jacobian`), clamped to [0, 1]: what a calibrated feedback with momentum 0 holds after the batch.
    The feedbacks are restored on exit."""
    layers = [m for m in model.modules() if isinstance(m, SfrnnRecurrentLayer)]
    saved_feedback = [layer.feedback for layer in layers]
    try:
        for layer, (hidden_states, initial_state, mask) in zip(layers, layer_inputs(model, batch)):
            estimate = mean_diagonal_jacobian(layer, hidden_states, initial_state, mask).clamp(0.0, 1.0)
            layer.feedback = estimate.to(layer.feedback.dtype)
        yield
    finally:
        for layer, feedback in zip(layers, saved_feedback):
            layer.feedback = feedback


def feedback_match(model, batch: dict) -> dict:
    """For every recurrent layer: how the model's feedback `a` compares with its measured memory, the mean over
    `batch` of diag(J_t) per state entry (`calibrated_on`). Returns `{"layers.i": {"correlation", "mean_abs_difference",
    "feedback_mean", "diag_jacobian_mean", "diag_jacobian_quantiles" (10%, 50%, 90%)}}`."""
    layers = [m for m in model.modules() if isinstance(m, SfrnnRecurrentLayer)]
    feedbacks = [layer.feedback.detach().double() for layer in layers]
    with calibrated_on(model, batch):
        measured = [layer.feedback.detach().double() for layer in layers]
    results = {}
    for index, (feedback, memory) in enumerate(zip(feedbacks, measured)):
        correlation = torch.corrcoef(torch.stack([feedback, memory]))[0, 1].item()
        results[f"layers.{index}"] = {
            "correlation": correlation,
            "mean_abs_difference": (feedback - memory).abs().mean().item(),
            "feedback_mean": feedback.mean().item(),
            "diag_jacobian_mean": memory.mean().item(),
            "diag_jacobian_quantiles": torch.quantile(memory, memory.new_tensor([0.1, 0.5, 0.9])).tolist(),
        }
    return results


def parameter_gradients(model, batch: dict, mode: str) -> dict[str, torch.Tensor]:
    """Gradients of the model's loss on `batch` (keyword arguments of its forward, with `labels`) in `mode` (a
    gradient mode, or `dsf_calibrated`)."""
    if mode == CALIBRATED:
        with calibrated_on(model, batch):
            return parameter_gradients(model, batch, "dsf")
    config = model.config  # (`dsf` holds a calibrated diagonal constant: measuring records no statistics)
    trained_mode = config.gradient_mode
    try:
        config.gradient_mode = mode
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        loss = model(**batch).loss
        grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
    finally:
        config.gradient_mode = trained_mode
    return {name: (g if g is not None else torch.zeros_like(p)) for (name, p), g in zip(named, grads)}


def _layer_of(name: str) -> str | None:
    """`model.layers.3.recurrent.weight_hh` -> `layers.3` (None for parameters outside the blocks)."""
    parts = name.split(".")
    return f"layers.{parts[parts.index('layers') + 1]}" if "layers" in parts else None


def gradient_fidelity(model, batches, modes=("dsf", "ft_bptt"), reference: str = "bptt") -> dict:
    """Per parameter tensor and per layer: cosine and norm ratio of each mode's gradient to the `reference` mode's,
    mean over `batches` (each compared on its own). The model's gradient mode is restored afterwards.

    Returns `{"parameters": {mode: {name: {"cosine", "norm_ratio"}}}, "layers": {mode: {"layers.i": {...}}}}`.
    """
    sums = {"parameters": {}, "layers": {}}
    for batch in batches:  # (`parameter_gradients` restores the mode)
        exact = parameter_gradients(model, batch, reference)
        exact_by_layer = _concatenate_by_layer(exact)
        for mode in modes:
            approximate = parameter_gradients(model, batch, mode)
            for kind, pairs in (("parameters", ((n, approximate[n], exact[n]) for n in exact)),
                                ("layers", ((n, g, exact_by_layer[n])
                                            for n, g in _concatenate_by_layer(approximate).items()))):
                for name, got, want in pairs:
                    entry = sums[kind].setdefault(mode, {}).setdefault(name, {"cosine": 0.0, "norm_ratio": 0.0})
                    entry["cosine"] += cosine_similarity(got, want)
                    entry["norm_ratio"] += norm_ratio(got, want)
    count = len(batches)
    return {kind: {mode: {name: {key: value / count for key, value in entry.items()} for name, entry in per.items()}
                   for mode, per in by_mode.items()} for kind, by_mode in sums.items()}


def _concatenate_by_layer(grads: dict) -> dict[str, torch.Tensor]:
    by_layer = {}
    for name, grad in grads.items():
        layer = _layer_of(name)
        if layer is not None:
            by_layer.setdefault(layer, []).append(grad.flatten())
    return {layer: torch.cat(parts) for layer, parts in by_layer.items()}


def state_gradient_contributions(layer: SfrnnRecurrentLayer, inputs, mask, errors, max_distance: int):
    """The state gradient of one layer split by time distance.

    Args:
        inputs: `(batch, time, d)` the layer's inputs; mask: `(batch, time)` or None.
        errors: `(batch, time, S)` `e_t`, the gradient reaching the states from outside the recurrence.
    Returns:
        `exact, dsf`, each `(max_distance + 1, batch, time, S)`: term k is `e_{t+k} J_{t+k} ... J_{t+1}` (exact) and
        `a^k e_{t+k}` (DSF). Their sums over k (up to `time - 1`) are the exact and the DSF state gradients.
    """
    weight_ih, weight_hh, bias_ih, bias_hh = (w.detach() for w in (layer.weight_ih, layer.weight_hh,
                                                                    layer.bias_ih, layer.bias_hh))
    initial_state = inputs.new_zeros(inputs.shape[0], layer.state_size)
    with torch.no_grad():
        states, _ = run_recurrence(layer.cell_type, inputs, initial_state, (weight_ih, weight_hh, bias_ih, bias_hh),
                                   mask, all_states=True)
    with torch.enable_grad():
        previous = torch.cat([initial_state.unsqueeze(1), states[:, :-1]], dim=1).requires_grad_()
        one_step = cell_step(layer.cell_type, F.linear(inputs.detach(), weight_ih, bias_ih), previous, weight_hh,
                             bias_hh, mask)

        def shift_left(term):  # the gradient at h_{t-1} is the next term's value at position t-1
            return torch.cat([term[:, 1:], torch.zeros_like(term[:, :1])], dim=1)

        exact_terms, dsf_terms = [errors], [errors]
        for _ in range(max_distance):
            vjp = torch.autograd.grad(one_step, previous, exact_terms[-1], retain_graph=True)[0]
            exact_terms.append(shift_left(vjp))
            dsf_terms.append(shift_left(layer.feedback * dsf_terms[-1]))
    return torch.stack(exact_terms), torch.stack(dsf_terms)


def state_gradient_fidelity(model, batch: dict, max_distance: int | None = None) -> dict:
    """For every recurrent layer: cosine and norm ratio of DSF's term to the exact term at each time distance, and
    of the total state gradients (DSF and FT-BPTT against exact). `e` is taken from an exact BPTT backward.

    Returns `{"layers.i": {"distance": [...], "cosine": [...], "norm_ratio": [...], "total_cosine_dsf",
    "total_cosine_ft_bptt", "total_norm_ratio_dsf"}}`.
    """
    layers = [m for m in model.modules() if isinstance(m, SfrnnRecurrentLayer)]
    captured = {}

    def capture(module, args, kwargs, output):
        record = captured.setdefault(module, {})
        record["inputs"] = args[0].detach()
        record["mask"] = args[2] if len(args) > 2 else kwargs.get("mask")
        output[0].register_hook(lambda grad: record.__setitem__("errors", grad.detach()))

    handles = [layer.register_forward_hook(capture, with_kwargs=True) for layer in layers]
    original_mode = model.config.gradient_mode
    try:
        model.config.gradient_mode = "bptt"
        model(**batch).loss.backward()
    finally:
        model.config.gradient_mode = original_mode
        for handle in handles:
            handle.remove()
        model.zero_grad(set_to_none=True)

    results = {}
    for index, layer in enumerate(layers):
        record = captured[layer]
        inputs, mask = record["inputs"], record["mask"]
        time = inputs.shape[1]
        distance = time - 1 if max_distance is None else min(max_distance, time - 1)
        errors = inputs.new_zeros(*inputs.shape[:2], layer.state_size)
        errors[..., : record["errors"].shape[-1]] = record["errors"]
        exact, dsf = state_gradient_contributions(layer, inputs, mask, errors, time - 1)
        exact_total, dsf_total = exact.sum(0), reverse_diagonal_scan(errors, layer.feedback)
        results[f"layers.{index}"] = {
            "distance": list(range(distance + 1)),
            "cosine": [cosine_similarity(dsf[k], exact[k]) for k in range(distance + 1)],
            "norm_ratio": [norm_ratio(dsf[k], exact[k]) for k in range(distance + 1)],
            "total_cosine_dsf": cosine_similarity(dsf_total, exact_total),
            "total_norm_ratio_dsf": norm_ratio(dsf_total, exact_total),
            "total_cosine_ft_bptt": cosine_similarity(errors, exact_total),
        }
    return results


def plot_fidelity(parameter_results: dict, state_results: dict | None, path) -> None:
    """Two panels: cosine to BPTT per parameter tensor for each mode, and per time distance for each layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 2 if state_results else 1
    figure, axes = plt.subplots(1, panels, figsize=(7 * panels, 4.5), squeeze=False)
    by_mode = parameter_results["parameters"]
    names = list(next(iter(by_mode.values())).keys())
    width = 0.8 / len(by_mode)
    for i, (mode, per_name) in enumerate(by_mode.items()):
        axes[0, 0].bar([j + i * width for j in range(len(names))], [per_name[n]["cosine"] for n in names], width,
                       label=mode)
    axes[0, 0].set_xticks([j + 0.4 - width / 2 for j in range(len(names))])
    axes[0, 0].set_xticklabels([n.removeprefix("model.") for n in names], rotation=60, ha="right", fontsize=7)
    axes[0, 0].set_ylabel("cosine to BPTT gradient")
    axes[0, 0].legend()
    if state_results:
        for layer, result in state_results.items():
            axes[0, 1].plot(result["distance"], result["cosine"], label=layer)
        axes[0, 1].set_xlabel("time distance k")
        axes[0, 1].set_ylabel("cosine(a^k e_{t+k}, e_{t+k} J...J)")
        axes[0, 1].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def ptb_batches(tokenizer, count: int, batch_size: int, split: str = "train", seed: int = 0) -> list[dict]:
    """`count` padded batches of PTB sentences (the paper's protocol), drawn at random with `seed`."""
    import torch

    from .config import DataConfig
    from .data import CausalLMCollator, prepare_data

    sentences = prepare_data(DataConfig(dataset="ptb", sequences="sentence", max_length=65), tokenizer).splits[split]
    order = torch.randperm(len(sentences), generator=torch.Generator().manual_seed(seed))
    collate = CausalLMCollator(tokenizer.pad_token_id)
    return [collate([sentences[int(i)] for i in order[k * batch_size:(k + 1) * batch_size]]) for k in range(count)]


def main(argv=None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="an sfrnn checkpoint trained on PTB (word level)")
    parser.add_argument("--tokenizer", help="its tokenizer folder (default: the checkpoint, then ../tokenizer)")
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--modes", nargs="+", default=["dsf", "ft_bptt", CALIBRATED, "diag_jacobian"],
                        choices=["dsf", "ft_bptt", CALIBRATED, "diag_jacobian"],
                        help=f"gradient modes compared with bptt, and {CALIBRATED} (DSF, feedback = the batch's mean "
                             "diag(J))")
    parser.add_argument("--max-distance", type=int, default=32)
    parser.add_argument("--out", default="fidelity.json")
    parser.add_argument("--plot", help="PNG path for the figure")
    args = parser.parse_args(argv)

    checkpoint = Path(args.checkpoint)
    candidates = [Path(args.tokenizer)] if args.tokenizer else [checkpoint, checkpoint.parent / "tokenizer",
                                                                 checkpoint.parent.parent / "tokenizer"]
    tokenizer_folder = next((c for c in candidates if (c / "tokenizer_config.json").exists()), None)
    if tokenizer_folder is None:
        raise SystemExit(f"No tokenizer found in {[str(c) for c in candidates]}; pass --tokenizer.")
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    model.train()  # the gradients of training, not of an eval-mode model
    batches = ptb_batches(AutoTokenizer.from_pretrained(tokenizer_folder), args.batches, args.batch_size)
    parameters = gradient_fidelity(model, batches, modes=tuple(args.modes))
    states = state_gradient_fidelity(model, batches[0], max_distance=args.max_distance)
    feedback = feedback_match(model, batches[0])
    Path(args.out).write_text(json.dumps({"checkpoint": str(checkpoint), "batches": args.batches,
                                          "batch_size": args.batch_size, **parameters, "state_gradients": states,
                                          "feedback_match": feedback}, indent=2))
    for mode, per_name in parameters["parameters"].items():
        print(f"{mode}: " + ", ".join(f"{name.removeprefix('model.')} {entry['cosine']:.3f}"
                                      for name, entry in per_name.items()))
    if args.plot:
        plot_fidelity(parameters, states, args.plot)
    print(f"wrote {args.out}" + (f" and {args.plot}" if args.plot else ""))


__all__ = ["gradient_fidelity", "parameter_gradients", "calibrated_on", "feedback_match", "CALIBRATED",
           "state_gradient_fidelity", "state_gradient_contributions", "plot_fidelity"]

if __name__ == "__main__":
    main()
