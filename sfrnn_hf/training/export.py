"""Turn a trained sfrnn model (and its tokenizer) into a complete Hugging Face Hub repository folder, and upload it
when a token and the network are available.

The folder holds: `model.safetensors`, `config.json` with the full `auto_map`, the flat modelling code
(`configuration_sfrnn.py`, `modeling_sfrnn.py` and their siblings), `generation_config.json`, the tokenizer files,
and a model card `README.md` with Hub metadata. It loads with `trust_remote_code=True` without this package.

    sfrnn-export outputs/demo hub/sfrnn-gru-ptb                              # perplexities from its results.json
    sfrnn-export outputs/demo hub/sfrnn-gru-ptb --repo-id me/sfrnn-gru-ptb   # also uploads

The card's perplexities are the ones measured on the exported weights: `--perplexity` / `--test-perplexity`, else
the `results.json` that `sfrnn-train` writes beside its final model, else the evaluation a Trainer checkpoint's
`trainer_state.json` holds for its own step; they were measured on `--dataset`, else on the dataset the run's own
`experiment.yaml` names. Every input is checked before anything is written (a sealed checkpoint must verify against its
`manifest.json`); the folder is written beside the output and renamed into place, so an earlier export there is
replaced whole or, on any failure, left whole.
"""

import argparse
import copy
import ctypes
import fnmatch
import json
import math
import os
import shutil
import sys
from importlib import resources
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import torch
from huggingface_hub import EvalResult, ModelCard, ModelCardData

import yaml

from ..cells_sfrnn import CELLS
from ..lora_targets import default_target_parameters
from ..recurrent_sfrnn import linspace_feedback
from .checkpoints import MANIFEST, damage
from .data import is_character_level, update_saved_tokenizer
from .run_folder import RUN_FILES

GRADIENT_MODE_NAMES = {
    "dsf": "Diagonal State Feedbacks (DSF)",
    "dsf_calibrated": "Diagonal State Feedbacks with a calibrated diagonal (dsf_calibrated: each optimizer step moves "
                      "the diagonal towards the units' mean diag(J_t))",
    "bptt": "exact backpropagation through time (BPTT)",
    "ft_bptt": "fully truncated BPTT (FT-BPTT)",
    "diag_jacobian": "the time-varying diagonal Jacobian (diag_jacobian: DSF's scan decayed by each step's own "
                     "diag(J_t))",
}
DATASET_NAMES = {"ptb_text_only": "Penn Treebank", "Salesforce/wikitext": "WikiText-103"}
# The Hub dataset behind each `data.dataset` of `sfrnn-train` (`text`, local files, has none).
HUB_DATASET_OF_RUN = {"ptb": "ptb_text_only", "ptb_char": "ptb_text_only", "wikitext-103": "Salesforce/wikitext",
                      "wikitext-2": "Salesforce/wikitext"}


class ExportError(ValueError):
    """An export's input cannot be used, or its output folder cannot be replaced: nothing was written."""


def feedback_description(model) -> str:
    """The DSF feedback diagonal as the model card states it: the paper's fixed linspace, or the calibrated values
    each layer holds (range and mean over its units)."""
    config = model.config
    width = config.hidden_size * config.state_multiplier
    paper = f"`linspace({config.feedback_min}, {config.feedback_max}, {width})`"
    layers = [layer.recurrent.feedback for layer in model.base_model.layers]
    initial = linspace_feedback(config)
    if all(torch.allclose(a.detach().cpu().float(), initial, rtol=0, atol=1e-6) for a in layers):  # never moved
        return f"{paper}, fixed"
    values = "; ".join(f"layer {i}: {a.min().item():.2f}-{a.max().item():.2f}, mean {a.mean().item():.2f}"
                       for i, a in enumerate(layers))
    return (f"calibrated from the units' mean diag(J) during training (momentum {config.feedback_momentum}, clamped "
            f"to [0, 1], starting from {paper}); now {values}")


def model_card(model, *, repo_id, datasets=(), perplexity=None, test_perplexity=None, eval_dataset=None,
               eval_command=None, license="apache-2.0", data_description=None, training_details=None,
               example_prompt="the company said", character_level=False):
    """The model card (`huggingface_hub.ModelCard`): Hub YAML metadata and a body from the package's template.
    `perplexity` and `test_perplexity` are the validation and test perplexity measured on `eval_dataset` (default:
    the first of `datasets`); with `character_level` (a token is a character) the card gives bits per character
    beside them, log2 of the perplexity."""
    config = model.config
    model_name = repo_id.split("/")[-1]
    eval_dataset = eval_dataset or (datasets[0] if datasets else None)
    perplexities = {split: value for split, value in (("validation", perplexity), ("test", test_perplexity))
                    if value is not None}
    if perplexities and eval_dataset is None:
        raise ValueError("A perplexity needs the dataset it was measured on (`eval_dataset` or `datasets`).")
    eval_results = [EvalResult(task_type="text-generation", dataset_type=eval_dataset,
                               dataset_name=DATASET_NAMES.get(eval_dataset, eval_dataset), dataset_split=split,
                               metric_type="perplexity", metric_value=value)
                    for split, value in perplexities.items()] or None
    card_data = ModelCardData(
        library_name="transformers", pipeline_tag="text-generation", license=license, datasets=list(datasets) or None,
        tags=["sfrnn", "rnn", config.cell_type, "dsf", "custom_code"], model_name=model_name, eval_results=eval_results,
    )
    template = resources.files(__package__).joinpath("model_card_template.md")
    return ModelCard.from_template(
        card_data, template_str=template.read_text(), model_name=model_name, repo_id=repo_id,
        cell_type=config.cell_type, cell_name=CELLS[config.cell_type].title, gradient_mode=config.gradient_mode,
        gradient_mode_name=GRADIENT_MODE_NAMES[config.gradient_mode], num_hidden_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size, block_type=config.block_type, vocab_size=config.vocab_size,
        num_parameters=f"{model.num_parameters():,}", feedback=feedback_description(model),
        data_description=data_description or ", ".join(DATASET_NAMES.get(d, d) for d in datasets) or "not recorded",
        training_details=training_details or {}, perplexities=perplexities,
        bits_per_character={split: math.log2(value) for split, value in perplexities.items()} if character_level else {},
        eval_dataset_name=DATASET_NAMES.get(eval_dataset, eval_dataset), eval_command=eval_command,
        example_prompt=example_prompt,
        lora_default_targets=json.dumps(default_target_parameters(config.cell_type)),
    )


def export_for_hub(model, tokenizer, folder, *, repo_id=None, **card_kwargs) -> Path:
    """Write the complete Hub repository folder for `model` and `tokenizer` (either may come from any checkpoint). A
    tokenizer saved by an older version of this package is written as today's (`data.update_saved_tokenizer`).

    `card_kwargs` go to `model_card` (datasets, perplexity, test_perplexity, eval_dataset, eval_command, license,
    data_description, training_details). The card is built first, the files are written to a folder beside `folder`
    and renamed into place: an earlier export in `folder` is replaced whole, or left whole if anything fails.
    Returns the folder.
    """
    folder = Path(folder)
    check_replaceable(folder)
    card = model_card(model, repo_id=repo_id or folder.name, **card_kwargs)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        model.save_pretrained(staging)  # weights, config with auto_map, code files, generation_config.json
        if tokenizer is not None:
            tokenizer = copy.deepcopy(tokenizer)
            update_saved_tokenizer(tokenizer)  # one saved by an older version: the pipeline keeps its spaces and <unk>
            tokenizer.save_pretrained(staging)
        card.save(staging / "README.md")
        _replace(folder, staging)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def check_replaceable(folder: Path) -> None:
    """`folder` is absent, empty, or holds only what an export writes (`run_folder.RUN_FILES` and a card); anything
    else (a user's file, a clone's `.git`) raises `ExportError` naming it: replacing the folder would delete it."""
    if not folder.exists():
        return
    if not folder.is_dir():
        raise ExportError(f"{folder} is a file, not a folder.")
    foreign = sorted(path.name for path in folder.iterdir() if path.name != "README.md"
                     and not any(fnmatch.fnmatchcase(path.name, pattern) for pattern in RUN_FILES))
    if foreign:
        raise ExportError(f"{folder} holds files that are not an export's ({', '.join(foreign[:3])}): an export "
                          "replaces the whole folder. Export into a new folder.")


def _replace(folder: Path, staging: Path) -> None:
    """Put the complete `staging` folder at `folder`: one atomic swap where the system has one (Linux
    `renameat2(RENAME_EXCHANGE)`), then the earlier folder, now at `staging`, deleted; elsewhere the earlier folder is
    moved aside first."""
    if not folder.exists():
        os.rename(staging, folder)
        return
    if _exchange(staging, folder):
        shutil.rmtree(staging)
        return
    old = folder.parent / f".{folder.name}.old-{os.getpid()}"
    os.rename(folder, old)
    try:
        os.rename(staging, folder)
    except OSError:
        os.rename(old, folder)
        raise
    shutil.rmtree(old)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux `renameat2` with `RENAME_EXCHANGE`); False where that is not available."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def upload_folder(folder, repo_id, token=None, private=False) -> str:
    """Upload exactly `folder` to the Hub repository `repo_id`. Returns the commit URL."""
    api = huggingface_hub.HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    return str(api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message="Upload sfrnn model"))


def upload_command(repo_id, folder, private=False) -> str:
    """The huggingface_hub CLI command that uploads `folder` to the root of `repo_id` (`hf upload REPO_ID LOCAL_PATH
    PATH_IN_REPO`; the older `huggingface-cli` no longer works)."""
    return f"hf upload {repo_id} {folder} .{' --private' if private else ''}"


def recorded_perplexities(folder) -> dict[str, float]:
    """The perplexities measured on the weights in `folder`, by split (`validation`, `test`): from `results.json`
    (`sfrnn-train` writes it beside the final model it evaluated), else, for a Trainer checkpoint, from
    `trainer_state.json`'s evaluation at the checkpoint's own step. Empty if neither records one; a checkpoint's
    best-so-far or a later epoch's evaluation is not this model's, so neither is taken."""
    folder = Path(folder)
    results_file, state_file = folder / "results.json", folder / "trainer_state.json"
    if results_file.exists():
        results = json.loads(results_file.read_text())
        return {split: results[f"{split}_perplexity"] for split in ("validation", "test")
                if results.get(f"{split}_perplexity") is not None}
    if state_file.exists():
        state = json.loads(state_file.read_text())
        for entry in state.get("log_history", []):
            if entry.get("step") == state.get("global_step") and ("eval_perplexity" in entry or "eval_loss" in entry):
                return {"validation": entry.get("eval_perplexity", math.exp(entry["eval_loss"]))}
    return {}


def key_value(text: str) -> tuple[str, str]:
    key, separator, value = text.partition("=")
    if not separator or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), value.strip()


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="sfrnn-export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a folder written by save_pretrained / the Trainer")
    parser.add_argument("output", help="the Hub repository folder to write")
    parser.add_argument("--tokenizer", help="tokenizer folder (default: the checkpoint's)")
    parser.add_argument("--repo-id", help="upload to this Hub repository (needs a token and the network)")
    parser.add_argument("--token", help="Hub token (default: HF_TOKEN or the saved login)")
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--dataset", action="append", default=[], help="Hub dataset id(s) the model was trained and measured on (default: the one the run's "
                        "experiment.yaml names)")
    parser.add_argument("--perplexity", type=float,
                        help="measured validation perplexity (default: the checkpoint's results.json or trainer_state.json)")
    parser.add_argument("--test-perplexity", type=float,
                        help="measured test perplexity (default: the checkpoint's results.json)")
    parser.add_argument("--eval-command", help="the command that measured the perplexity, quoted in the card")
    parser.add_argument("--data-description", help="what the model was trained on, for the card's training table")
    parser.add_argument("--detail", type=key_value, action="append", default=[], metavar="KEY=VALUE",
                        help="a row of the card's training table (repeat for more)")
    parser.add_argument("--license", default="apache-2.0")
    return parser.parse_args(argv)


def check_checkpoint(checkpoint) -> None:
    """`checkpoint` is a model folder, and a checkpoint `sfrnn-train` sealed verifies against its manifest (an
    `sfrnn-train` checkpoint without one was not completely written); else `ExportError` naming the fault."""
    checkpoint = Path(checkpoint)
    if not (checkpoint / "config.json").exists():
        raise ExportError(f"{str(checkpoint)!r} is not a model folder (no config.json).")
    sealed_by_training = (checkpoint / "trainer_state.json").exists() and (checkpoint / "experiment.yaml").exists()
    if (checkpoint / MANIFEST).exists() or sealed_by_training:
        reason = damage(str(checkpoint))
        if reason is not None:
            raise ExportError(f"{checkpoint} is not an intact checkpoint: {reason}. Export an intact one.")


def run_data(checkpoint) -> dict:
    """The `data` section of the `experiment.yaml` of the run that wrote `checkpoint` (empty when none is recorded)."""
    path = Path(checkpoint) / "experiment.yaml"
    return ((yaml.safe_load(path.read_text()) or {}).get("data") or {}) if path.exists() else {}


def run_datasets(checkpoint) -> list[str]:
    """The Hub dataset the run that wrote `checkpoint` was trained and measured on (`HUB_DATASET_OF_RUN`); empty when
    none is recorded or the run read local files."""
    dataset = run_data(checkpoint).get("dataset")
    return [HUB_DATASET_OF_RUN[dataset]] if dataset in HUB_DATASET_OF_RUN else []


def main(argv=None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    args = parse_args(argv)
    tokenizer_path = args.tokenizer or args.checkpoint
    has_tokenizer = Path(tokenizer_path, "tokenizer_config.json").exists()
    recorded = recorded_perplexities(args.checkpoint)
    perplexity = args.perplexity if args.perplexity is not None else recorded.get("validation")
    test_perplexity = args.test_perplexity if args.test_perplexity is not None else recorded.get("test")
    datasets = args.dataset or run_datasets(args.checkpoint)
    recorded_data = run_data(args.checkpoint)
    data = SimpleNamespace(dataset=recorded_data.get("dataset"), tokenizer=recorded_data.get("tokenizer"))
    try:  # every input, before anything is written
        check_checkpoint(args.checkpoint)
        if args.tokenizer and not has_tokenizer:
            raise ExportError(f"--tokenizer {args.tokenizer!r} holds no tokenizer (no tokenizer_config.json).")
        if (perplexity is not None or test_perplexity is not None) and not datasets:
            raise ExportError("the perplexity needs the Hub dataset it was measured on: pass --dataset (the run's "
                              "experiment.yaml names none, or local files).")
        check_replaceable(Path(args.output))
    except ExportError as error:
        sys.exit(f"sfrnn-export: {error}")
    model = AutoModelForCausalLM.from_pretrained(args.checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path) if has_tokenizer else None
    if tokenizer is None:
        print(f"sfrnn-export: no tokenizer in {tokenizer_path!r}; the folder will have none.", file=sys.stderr)
    folder = export_for_hub(model, tokenizer, args.output, repo_id=args.repo_id, datasets=datasets,
                            perplexity=perplexity, test_perplexity=test_perplexity, eval_command=args.eval_command,
                            license=args.license, data_description=args.data_description,
                            training_details=dict(args.detail), character_level=is_character_level(data))
    print(f"wrote {folder}: {', '.join(sorted(p.name for p in folder.iterdir()))}")
    if not args.repo_id:
        print("not uploaded: no --repo-id given.")
        return 0
    token = args.token or huggingface_hub.get_token()
    if huggingface_hub.constants.HF_HUB_OFFLINE or not token:
        reason = "HF_HUB_OFFLINE is set" if huggingface_hub.constants.HF_HUB_OFFLINE else "no Hub token"
        print(f"not uploaded ({reason}): the folder {folder} is complete; upload it later with "
              f"`{upload_command(args.repo_id, folder, args.private)}`.")
        return 1
    try:
        url = upload_folder(folder, args.repo_id, token=token, private=args.private)
    except Exception as error:  # network, permissions: the folder is written either way
        print(f"not uploaded ({type(error).__name__}: {error}); the folder {folder} is complete.")
        return 1
    print(f"uploaded {folder} to {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
