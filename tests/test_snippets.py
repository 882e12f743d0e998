"""Every Python block of README.md and of the model cards (model_cards/*.md) runs as written, alone, in a fresh
interpreter started in a scratch folder: each block defines what it uses. README blocks run where the package is
installed but not imported (unless the block imports it); card blocks where it cannot be imported at all, as the
cards promise.

A block that names a committed checkpoint (`checkpoints/<name>`) runs on that folder of the repository when it is
there; until it is committed, on a tiny stand-in saved the same way (weights, remote code, word tokenizer), so the
block's code is still checked."""

import re
from pathlib import Path

import pytest
import torch

from conftest import make_word_tokenizer
from sfrnn_hf import SfrnnConfig, SfrnnForCausalLM
from test_hub_export import NO_PACKAGE, run_as_user

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted(p for p in (ROOT / "model_cards").glob("*.md") if p.name != "template.md")]
CHECKPOINT = re.compile(r"""["'](checkpoints/[\w.-]+)["']""")


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", path.read_text(), flags=re.S | re.M)


BLOCKS = [(path, i, code) for path in DOCUMENTS for i, code in enumerate(python_blocks(path))]


def stand_in_checkpoint(folder: Path) -> None:
    tokenizer = make_word_tokenizer("the company said shares fell".split())
    torch.manual_seed(0)
    config = SfrnnConfig(vocab_size=len(tokenizer), hidden_size=8, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    SfrnnForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def test_the_documents_have_the_blocks_this_test_runs():
    assert sum(path.name == "README.md" for path, _, _ in BLOCKS) >= 5
    assert {path.name for path, _, _ in BLOCKS} == {path.name for path in DOCUMENTS}  # every card has code


@pytest.mark.parametrize("path, index, code", BLOCKS, ids=[f"{p.name}-{i}" for p, i, _ in BLOCKS])
def test_the_block_runs_as_written(tmp_path, path, index, code):
    for name in sorted(set(CHECKPOINT.findall(code))):
        committed, target = ROOT / name, tmp_path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if committed.is_dir():
            target.symlink_to(committed)
        else:
            stand_in_checkpoint(target)
    # README: the package installed (this checkout, importable, not imported); a card: no package at all.
    prefix = f"import sys\nsys.path.insert(0, {str(ROOT)!r})\n" if path.name == "README.md" else NO_PACKAGE
    run_as_user(tmp_path, prefix + code, timeout=600)


MACHINE_PATH = re.compile(r"(?<![\w.~/-])/(?:work|root|home|tmp|Users|opt|mnt|data)/[\w./-]*")


def test_the_documentation_names_no_machine_paths():
    """Docs and the commands in them name paths relative to the repository, never one machine's folders."""
    texts = [*ROOT.glob("*.md"), *ROOT.glob("docs/*.md"), *ROOT.glob("model_cards/*.md"), *ROOT.glob("examples/**/*"),
             *ROOT.glob("benchmarks/*"), *ROOT.glob("sfrnn_hf/**/*.md")]
    found = {str(path.relative_to(ROOT)): MACHINE_PATH.findall(path.read_text())
             for path in texts if path.is_file() and path.suffix in (".md", ".py", ".sh", ".yaml")}
    assert {path: paths for path, paths in found.items() if paths} == {}


def test_the_readme_launch_commands_each_write_their_own_folder():
    """A run owns its output_dir: two README lines that train into one folder cannot run one after the other."""
    blocks = re.findall(r"^```bash\n(.*?)^```", (ROOT / "README.md").read_text(), flags=re.S | re.M)
    for block in blocks:
        launches = [line for line in block.splitlines() if re.match(r"(torchrun|accelerate launch) ", line)]
        folders = [re.search(r"--output-dir (\S+)", line) for line in launches]
        assert all(folders), [line for line, folder in zip(launches, folders) if not folder]
        folders = [folder.group(1) for folder in folders]
        assert len(set(folders)) == len(folders), folders
    assert sum("torchrun" in block for block in blocks) >= 2


def test_the_readme_commands_read_no_run_folder_that_only_a_long_training_makes():
    """`runs/...` is where training writes: a README command may write there (`--output-dir`), never read from it;
    commands that need a trained model name the committed checkpoint."""
    blocks = re.findall(r"^```bash\n(.*?)^```", (ROOT / "README.md").read_text(), flags=re.S | re.M)
    reads = [line for block in blocks for line in block.splitlines()
             if re.search(r"(?<!--output-dir )(?<![\w/.-])runs/", line)]
    assert reads == []
