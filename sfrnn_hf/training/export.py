"""Turn a trained sfrnn model (and its tokenizer) into a complete Hugging Face Hub repository folder, and upload it
when a token and the network are available.

The folder holds: `model.safetensors`, `config.json` with the full `auto_map`, the flat modelling code
(`configuration_sfrnn.py`, `modeling_sfrnn.py` and their siblings), `generation_config.json`, the tokenizer files,
and a model card `README.md` with Hub metadata. It loads with `trust_remote_code=True` without this package.

    sfrnn-export runs/ptb-demo/best hub/sfrnn-gru-ptb --perplexity 141.2 --dataset ptb_text_only
    sfrnn-export runs/ptb-demo/best hub/sfrnn-gru-ptb --repo-id me/sfrnn-gru-ptb     # also uploads
"""

import argparse
import copy
import json
import math
import os
import sys
from importlib import resources
from pathlib import Path

import huggingface_hub
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..cells_sfrnn import CELLS
from .data import add_word_decoder

GRADIENT_MODE_NAMES = {
    "dsf": "Diagonal State Feedbacks (DSF)",
    "bptt": "exact backpropagation through time (BPTT)",
    "ft_bptt": "fully truncated BPTT (FT-BPTT)",
    "diag_jacobian": "the time-varying diagonal Jacobian (diag_jacobian: DSF's scan decayed by each step's own "
                     "diag(J_t))",
}
DATASET_NAMES = {"ptb_text_only": "Penn Treebank", "Salesforce/wikitext": "WikiText-103"}


def feedback_description(model) -> str:
    """The DSF feedback diagonal as the model card states it: the paper's fixed linspace, or the calibrated values
    each layer holds (range and mean over its units)."""
    config = model.config
    width = config.hidden_size * config.state_multiplier
    paper = f"`linspace({config.feedback_min}, {config.feedback_max}, {width})`"
    if config.feedback_type != "calibrated":
        return f"{paper}, fixed"
    layers = [layer.recurrent.feedback for layer in model.base_model.layers]
    values = "; ".join(f"layer {i}: {a.min().item():.2f}-{a.max().item():.2f}, mean {a.mean().item():.2f}"
                       for i, a in enumerate(layers))
    return (f"calibrated from the units' mean diag(J) during training (momentum {config.feedback_momentum}, clamped "
            f"to [0, 1], starting from {paper}); now {values}")


def model_card(model, *, repo_id, datasets=(), perplexity=None, eval_dataset=None, eval_command=None,
               license="apache-2.0", data_description=None, training_details=None, example_prompt="the company said"):
    """The model card (`huggingface_hub.ModelCard`): Hub YAML metadata and a body from the package's template."""
    config = model.config
    model_name = repo_id.split("/")[-1]
    eval_dataset = eval_dataset or (datasets[0] if datasets else None)
    eval_results = None
    if perplexity is not None:
        if eval_dataset is None:
            raise ValueError("A perplexity needs the dataset it was measured on (`eval_dataset` or `datasets`).")
        eval_results = [EvalResult(task_type="text-generation", dataset_type=eval_dataset,
                                   dataset_name=DATASET_NAMES.get(eval_dataset, eval_dataset),
                                   dataset_split="validation", metric_type="perplexity", metric_value=perplexity)]
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
        training_details=training_details or {}, perplexity=perplexity,
        eval_dataset_name=DATASET_NAMES.get(eval_dataset, eval_dataset), eval_command=eval_command,
        example_prompt=example_prompt,
    )


def export_for_hub(model, tokenizer, folder, *, repo_id=None, **card_kwargs) -> Path:
    """Write the complete Hub repository folder for `model` and `tokenizer` (either may come from any checkpoint). A
    word-level tokenizer without a decoder (saved before `data.word_decoder` existed) is written with it.

    `card_kwargs` go to `model_card` (datasets, perplexity, eval_dataset, eval_command, license, data_description,
    training_details). Returns the folder.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)  # weights, config with auto_map, code files, generation_config.json
    if tokenizer is not None:
        tokenizer = copy.deepcopy(tokenizer)
        add_word_decoder(tokenizer)  # a word tokenizer saved by an older version: the pipeline keeps its spaces
        tokenizer.save_pretrained(folder)
    card = model_card(model, repo_id=repo_id or folder.name, **card_kwargs)
    card.save(folder / "README.md")
    return folder


def upload_folder(folder, repo_id, token=None, private=False) -> str:
    """Upload exactly `folder` to the Hub repository `repo_id`. Returns the commit URL."""
    api = huggingface_hub.HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    return str(api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message="Upload sfrnn model"))


def upload_command(repo_id, folder, private=False) -> str:
    """The huggingface_hub CLI command that uploads `folder` to the root of `repo_id` (`hf upload REPO_ID LOCAL_PATH
    PATH_IN_REPO`; the older `huggingface-cli` no longer works)."""
    return f"hf upload {repo_id} {folder} .{' --private' if private else ''}"


def best_perplexity_from_trainer_state(checkpoint) -> float | None:
    """The best validation perplexity recorded by the Trainer next to (or above) a checkpoint, if any."""
    for candidate in (Path(checkpoint), Path(checkpoint).parent):
        state_file = candidate / "trainer_state.json"
        if state_file.exists():
            history = json.loads(state_file.read_text()).get("log_history", [])
            values = [e["eval_perplexity"] if "eval_perplexity" in e else math.exp(e["eval_loss"])
                      for e in history if "eval_perplexity" in e or "eval_loss" in e]
            return min(values) if values else None
    return None


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="sfrnn-export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a folder written by save_pretrained / the Trainer")
    parser.add_argument("output", help="the Hub repository folder to write")
    parser.add_argument("--tokenizer", help="tokenizer folder (default: the checkpoint's)")
    parser.add_argument("--repo-id", help="upload to this Hub repository (needs a token and the network)")
    parser.add_argument("--token", help="Hub token (default: HF_TOKEN or the saved login)")
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--dataset", action="append", default=[], help="Hub dataset id(s) used for training")
    parser.add_argument("--perplexity", type=float, help="measured validation perplexity (default: trainer_state.json)")
    parser.add_argument("--eval-command", help="the command that measured the perplexity, quoted in the card")
    parser.add_argument("--license", default="apache-2.0")
    return parser.parse_args(argv)


def main(argv=None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    args = parse_args(argv)
    if not Path(args.checkpoint, "config.json").exists():
        sys.exit(f"sfrnn-export: {args.checkpoint!r} is not a model folder (no config.json).")
    model = AutoModelForCausalLM.from_pretrained(args.checkpoint)
    tokenizer_path = args.tokenizer or args.checkpoint
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path) if Path(tokenizer_path, "tokenizer_config.json").exists() else None
    if tokenizer is None:
        print(f"sfrnn-export: no tokenizer in {tokenizer_path!r}; the folder will have none.", file=sys.stderr)
    perplexity = args.perplexity if args.perplexity is not None else best_perplexity_from_trainer_state(args.checkpoint)
    folder = export_for_hub(model, tokenizer, args.output, repo_id=args.repo_id, datasets=args.dataset,
                            perplexity=perplexity, eval_command=args.eval_command, license=args.license)
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
