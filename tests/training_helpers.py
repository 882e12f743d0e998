"""Tiny corpora and configs for the training-pipeline tests (seconds per run on 2 CPU cores)."""

import random

from sfrnn_hf.training.config import load_config

WORDS = "the a cat dog sat ran on under mat rug big small red blue and then it was here there".split()


def write_corpus(path, lines: int, seed: int, min_words: int = 3, max_words: int = 14):
    """`lines` random sentences of varying length (so batches need padding), one per line."""
    rng = random.Random(seed)
    with open(path, "w") as handle:
        for _ in range(lines):
            handle.write(" ".join(rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words))) + "\n")
    return str(path)


def tiny_experiment(tmp_path, *overrides, train_lines=64, validation=False):
    """A word-level sentence-layout experiment on local files with a tiny GRU, no evaluation during training."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    train = write_corpus(tmp_path / "train.txt", train_lines, seed=1)
    files = [f"data.train_files=[{train}]"]
    if validation:
        files.append(f"data.validation_files=[{write_corpus(tmp_path / 'valid.txt', 16, seed=2)}]")
    return load_config(None, [
        "data.dataset=text", "data.tokenizer=word", "data.sequences=sentence", "data.max_length=16", *files,
        "model.hidden_size=16", "model.num_hidden_layers=2", "model.cell_type=gru",
        f"training.output_dir={tmp_path / 'run'}", "training.batch_size=8", "training.max_steps=4",
        "training.learning_rate=1.0e-2", "training.eval_strategy=no", "training.evaluate_test=false", "training.logging_steps=1",
        "training.report_to=none", "training.disable_tqdm=true", "training.save_strategy=no",
        *overrides,
    ])


def logged_losses(trainer) -> dict[int, float]:
    """Training loss logged at each step (`logging_steps=1`)."""
    return {entry["step"]: entry["loss"] for entry in trainer.state.log_history if "loss" in entry}
