"""Publishing: the exported folder is a complete Hub repository that loads with `trust_remote_code=True` in a fresh
interpreter where sfrnn_hf cannot be imported, with bit-identical logits, a working generate and every gradient mode;
its model card carries valid Hub metadata and states the mode and the feedback the model has."""

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM

from sfrnn_hf import GRADIENT_MODES, SfrnnConfig, SfrnnForCausalLM
from sfrnn_hf.training import export as export_module
from sfrnn_hf.training.checkpoints import MANIFEST, write_manifest
from sfrnn_hf.training.export import GRADIENT_MODE_NAMES, export_for_hub, recorded_perplexities

REMOTE_USER = textwrap.dedent("""
    import sys
    sys.modules["sfrnn_hf"] = None  # the package is not installed for this user
    try:
        import sfrnn_hf
    except ImportError:
        pass
    else:
        raise SystemExit("sfrnn_hf is importable: the test would prove nothing")
    import torch
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    folder, out = sys.argv[1], sys.argv[2]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer(["w1 w2 w3 w4 w5 w6", "w7 w8 w9 w10 w11 w12"], return_tensors="pt").input_ids
    causal = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    base = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    assert "sfrnn_hf" not in type(causal).__module__, type(causal).__module__
    with torch.no_grad():
        result = {"ids": ids, "logits": causal(input_ids=ids).logits,
                  "hidden": base(input_ids=ids).last_hidden_state,
                  "generated": causal.generate(ids, max_new_tokens=6, do_sample=False)}
    causal.train()
    for mode in ("bptt", "dsf", "ft_bptt", "diag_jacobian"):
        causal.config.gradient_mode = mode
        loss = causal(input_ids=ids, labels=ids).loss
        result["grad_" + mode] = torch.autograd.grad(loss, causal.model.layers[0].recurrent.weight_hh)[0]
    torch.save(result, out)
""")


def exported_model(tmp_path, tokenizer, cell):
    config = SfrnnConfig(vocab_size=len(tokenizer), hidden_size=12, num_hidden_layers=2, cell_type=cell,
                         block_type="prenorm", pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = SfrnnForCausalLM(config).eval()
    with torch.no_grad():
        model.model.layers[0].recurrent.weight_hh.mul_(3)
    folder = export_for_hub(model, tokenizer, tmp_path / "hub", repo_id="someone/sfrnn-test",
                            datasets=["ptb_text_only"], perplexity=123.45, eval_command="sfrnn-train --eval")
    return model, folder


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_remote_code_round_trip_without_the_package(tmp_path, word_tokenizer, cell):
    model, folder = exported_model(tmp_path, word_tokenizer, cell)
    out = tmp_path / "remote.pt"
    script = tmp_path / "remote_user.py"
    script.write_text(REMOTE_USER)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, str(script), str(folder), str(out)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    remote = torch.load(out)
    ids = remote["ids"]
    assert torch.equal(ids, word_tokenizer(["w1 w2 w3 w4 w5 w6", "w7 w8 w9 w10 w11 w12"], return_tensors="pt").input_ids)
    with torch.no_grad():
        assert torch.equal(remote["logits"], model(input_ids=ids).logits)
        assert torch.equal(remote["hidden"], model.model(input_ids=ids).last_hidden_state)
        assert torch.equal(remote["generated"], model.generate(ids, max_new_tokens=6, do_sample=False))
    model.train()
    for mode in ("bptt", "dsf", "ft_bptt", "diag_jacobian"):
        model.config.gradient_mode = mode
        loss = model(input_ids=ids, labels=ids).loss
        want = torch.autograd.grad(loss, model.model.layers[0].recurrent.weight_hh)[0]
        torch.testing.assert_close(remote["grad_" + mode], want, rtol=1e-6, atol=1e-8, msg=mode)
    assert not torch.allclose(remote["grad_dsf"], remote["grad_ft_bptt"])
    assert not torch.allclose(remote["grad_diag_jacobian"], remote["grad_dsf"])


def test_exported_folder_is_a_complete_hub_repository(tmp_path, word_tokenizer):
    model, folder = exported_model(tmp_path, word_tokenizer, "gru")
    files = {p.name for p in folder.iterdir()}
    for name in ("model.safetensors", "config.json", "generation_config.json", "configuration_sfrnn.py",
                 "modeling_sfrnn.py", "tokenizer.json", "tokenizer_config.json", "README.md"):
        assert name in files, name
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "configuration_sfrnn.SfrnnConfig",
                                  "AutoModel": "modeling_sfrnn.SfrnnModel",
                                  "AutoModelForCausalLM": "modeling_sfrnn.SfrnnForCausalLM",
                                  "AutoModelForSequenceClassification": "modeling_sfrnn.SfrnnForSequenceClassification"}
    # Hub-facing code imports only torch, transformers (with huggingface_hub, which transformers requires and whose strict
    # dataclasses its configs are) and flat siblings (which are all in the folder).
    for code in folder.glob("*.py"):
        for line in code.read_text().splitlines():
            if line.startswith(("import ", "from ")):
                module = line.split()[1]
                root = module.split(".")[0]
                allowed = root in {"torch", "transformers", "huggingface_hub"} or root in sys.stdlib_module_names
                assert allowed or module.startswith("."), (code.name, line)
                if module.startswith("."):
                    assert (folder / f"{module[1:]}.py").exists(), (code.name, line)

    readme = (folder / "README.md").read_text()
    front_matter = yaml.safe_load(readme.split("---")[1])
    assert front_matter["library_name"] == "transformers"
    assert front_matter["pipeline_tag"] == "text-generation"
    assert front_matter["license"] == "apache-2.0"
    assert front_matter["datasets"] == ["ptb_text_only"]
    assert {"sfrnn", "gru", "dsf"} <= set(front_matter["tags"])
    metric = front_matter["model-index"][0]["results"][0]["metrics"][0]
    assert metric == {"type": "perplexity", "value": 123.45}
    card = ModelCard.load(folder / "README.md")  # the Hub's own parser accepts it
    assert card.data.eval_results[0].metric_value == 123.45
    body = card.text
    assert "2503.23104" in body and "trust_remote_code=True" in body and 'from_pretrained("someone/sfrnn-test"' in body
    assert "`dsf`" in body and "`gru`" in body and "123.45" in body


def test_model_card_states_the_mode_and_the_feedback_the_model_has(tmp_path, word_tokenizer):
    _, folder = exported_model(tmp_path / "paper", word_tokenizer, "gru")
    assert "| feedback diagonal | `linspace(0.0, 1.0, 12)`, fixed |" in (folder / "README.md").read_text()

    # A calibrated feedback is not the paper's linspace: the card gives each layer's values (written here by hand).
    config = dict(gradient_mode="dsf_calibrated", feedback_momentum=0.5)
    model = SfrnnForCausalLM(SfrnnConfig(vocab_size=len(word_tokenizer), hidden_size=12, num_hidden_layers=2,
                                         **config))
    model.model.layers[0].recurrent.feedback = torch.linspace(0.1, 0.5, 12)
    model.model.layers[1].recurrent.feedback = torch.full((12,), 0.25)
    folder = export_for_hub(model, word_tokenizer, tmp_path / "calibrated" / "hub", repo_id="someone/calibrated")
    body = ModelCard.load(folder / "README.md").text
    assert "dsf_calibrated" in body and "linspace(0.0, 1.0, 12)`, fixed" not in body
    assert "momentum 0.5" in body and "layer 0: 0.10-0.50, mean 0.30; layer 1: 0.25-0.25, mean 0.25" in body
    assert set(GRADIENT_MODE_NAMES) == set(GRADIENT_MODES)  # every mode a model can be trained in has a name


def test_export_command_writes_the_folder_and_says_it_did_not_upload(tmp_path, word_tokenizer):
    model = SfrnnForCausalLM(SfrnnConfig(vocab_size=len(word_tokenizer), hidden_size=8))
    model.save_pretrained(tmp_path / "ckpt")
    word_tokenizer.save_pretrained(tmp_path / "ckpt")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "sfrnn_hf.training.export", str(tmp_path / "ckpt"), str(tmp_path / "out")]
    done = subprocess.run(command + ["--repo-id", "me/x", "--perplexity", "99.5", "--dataset", "ptb_text_only"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr[-2000:]
    assert "not uploaded (HF_HUB_OFFLINE is set)" in done.stdout
    # The command it names is the installed CLI's (`huggingface-cli` no longer works): `hf upload REPO_ID LOCAL_PATH
    # PATH_IN_REPO`, the folder to the repository's root.
    assert f"`hf upload me/x {tmp_path / 'out'} .`" in done.stdout and "huggingface-cli" not in done.stdout
    usage = subprocess.run([sys.executable, "-m", "huggingface_hub.cli.hf", "upload", "--help"], env=env,
                           capture_output=True, text=True, timeout=120).stdout
    assert "upload [OPTIONS] REPO_ID [LOCAL_PATH] [PATH_IN_REPO]" in " ".join(usage.split())
    assert (tmp_path / "out" / "model.safetensors").exists() and (tmp_path / "out" / "tokenizer.json").exists()
    local_only = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert local_only.returncode == 0 and "not uploaded: no --repo-id given" in local_only.stdout
    missing = subprocess.run([sys.executable, "-m", "sfrnn_hf.training.export", str(tmp_path / "nope"), str(tmp_path / "o2")],
                             env=env, capture_output=True, text=True, timeout=300)
    assert missing.returncode != 0 and "not a model folder" in missing.stderr


def test_the_card_gives_validation_and_test_perplexity_as_hub_metadata_and_in_a_table(tmp_path, word_tokenizer):
    model = SfrnnForCausalLM(SfrnnConfig(vocab_size=len(word_tokenizer), hidden_size=8))
    folder = export_for_hub(model, word_tokenizer, tmp_path / "hub", repo_id="someone/x", datasets=["ptb_text_only"],
                            perplexity=137.14, test_perplexity=133.5, eval_command="sfrnn-train ptb_gru_1x256",
                            training_details={"optimizer": "Adam, lr 1e-3"})
    card = ModelCard.load(folder / "README.md")
    splits = {result.dataset_split: result.metric_value for result in card.data.eval_results}
    assert splits == {"validation": 137.14, "test": 133.5}
    assert {result.dataset_name for result in card.data.eval_results} == {"Penn Treebank"}
    assert "| validation | **137.14** |" in card.text and "| test | **133.50** |" in card.text
    assert "by `sfrnn-train ptb_gru_1x256`" in card.text and "| optimizer | Adam, lr 1e-3 |" in card.text
    # A test perplexity alone is stated too; a perplexity without the data it was measured on is refused.
    alone = export_for_hub(model, None, tmp_path / "alone", datasets=["ptb_text_only"], test_perplexity=99.0)
    assert [r.dataset_split for r in ModelCard.load(alone / "README.md").data.eval_results] == ["test"]
    with pytest.raises(ValueError, match="dataset it was measured on"):
        export_for_hub(model, None, tmp_path / "nodata", test_perplexity=99.0)


def test_recorded_perplexities_are_the_ones_measured_on_the_folders_weights(tmp_path):
    # sfrnn-train's output folder: results.json describes the final (best) model saved beside it.
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "results.json").write_text(json.dumps(
        {"global_step": 90, "validation_perplexity": 140.5, "test_perplexity": 135.25, "best_checkpoint": "x"}))
    assert recorded_perplexities(tmp_path / "run") == {"validation": 140.5, "test": 135.25}
    # A Trainer checkpoint: the evaluation at its own step, not the best of its history.
    state = {"global_step": 60, "log_history": [
        {"step": 30, "eval_loss": 4.0, "eval_perplexity": 54.6}, {"step": 60, "loss": 4.2},
        {"step": 60, "eval_loss": 4.5, "eval_perplexity": 90.0}]}
    (tmp_path / "checkpoint-60").mkdir()
    (tmp_path / "checkpoint-60" / "trainer_state.json").write_text(json.dumps(state))
    assert recorded_perplexities(tmp_path / "checkpoint-60") == {"validation": 90.0}
    # A checkpoint saved between evaluations has none of its own: nothing is claimed for it.
    state = {"global_step": 50, "log_history": [{"step": 30, "eval_loss": 4.0, "eval_perplexity": 54.6}]}
    (tmp_path / "checkpoint-50").mkdir()
    (tmp_path / "checkpoint-50" / "trainer_state.json").write_text(json.dumps(state))
    assert recorded_perplexities(tmp_path / "checkpoint-50") == {}
    assert recorded_perplexities(tmp_path) == {}


def test_export_command_takes_the_perplexities_sfrnn_train_measured(tmp_path, word_tokenizer):
    model = SfrnnForCausalLM(SfrnnConfig(vocab_size=len(word_tokenizer), hidden_size=8))
    model.save_pretrained(tmp_path / "run")
    word_tokenizer.save_pretrained(tmp_path / "run")
    (tmp_path / "run" / "results.json").write_text(json.dumps({"validation_perplexity": 217.34,
                                                                "test_perplexity": 205.0}))
    command = [sys.executable, "-m", "sfrnn_hf.training.export", str(tmp_path / "run"), str(tmp_path / "out"),
               "--dataset", "ptb_text_only", "--detail", "epochs=30", "--detail", "batches=128 sentences, random"]
    done = subprocess.run(command, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert {r.dataset_split: r.metric_value for r in card.data.eval_results} == {"validation": 217.34, "test": 205.0}
    assert "| epochs | 30 |" in card.text and "| batches | 128 sentences, random |" in card.text
    bad = subprocess.run(command[:5] + ["--detail", "epochs"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "expected KEY=VALUE, got 'epochs'" in bad.stderr


def test_model_cards_template_is_the_template_the_package_installs():
    from importlib import resources

    link = Path(__file__).resolve().parents[1] / "model_cards" / "template.md"
    installed = resources.files("sfrnn_hf.training").joinpath("model_card_template.md")
    assert link.read_text() == installed.read_text()


NO_PACKAGE = 'import sys\nsys.modules["sfrnn_hf"] = None  # the package is not installed for this user\n'
PROMPT_TEXT = "Do you wish to run the custom code"


def run_as_user(tmp_path, code, timeout=300):
    """`code` in a fresh interpreter with stdin closed (so transformers cannot wait for an answer) and a timeout:
    a loading step that would prompt shows its question in the output instead of hanging."""
    script = tmp_path / "user.py"
    script.write_text(code)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    return output


def test_the_cards_usage_code_runs_without_the_package_and_without_a_prompt(tmp_path, word_tokenizer):
    model = SfrnnForCausalLM(SfrnnConfig(vocab_size=len(word_tokenizer), hidden_size=12,
                                         pad_token_id=word_tokenizer.pad_token_id))
    folder = export_for_hub(model, word_tokenizer, tmp_path / "hub", repo_id="someone/sfrnn-test",
                            example_prompt="w1 w2 w3")
    blocks = (folder / "README.md").read_text().split("```python\n")[1:]
    for code in blocks:
        code = code.split("```")[0].replace('"someone/sfrnn-test"', repr(str(folder)))
        output = run_as_user(tmp_path, NO_PACKAGE + code)
        assert PROMPT_TEXT not in output and "model of type" not in output, output[-3000:]
        generated = [line for line in output.splitlines() if "w1 w2 w3" in line]
        assert len(generated) == 1 and generated[0].strip().startswith("w1 w2 w3 w"), output[-3000:]
    assert len(blocks) == 2  # the pipeline, and the step-by-step form


def test_the_tokenizer_loads_without_a_prompt_with_or_without_the_package(tmp_path, word_tokenizer):
    model = SfrnnForCausalLM(SfrnnConfig(vocab_size=len(word_tokenizer), hidden_size=8))
    model.save_pretrained(tmp_path / "saved")  # save_pretrained + tokenizer: the same folder as sfrnn-export's
    word_tokenizer.save_pretrained(tmp_path / "saved")
    check = ("ids = tokenizer('w1 w2')['input_ids']\n"
             "assert ids == [tokenizer.convert_tokens_to_ids(t) for t in ('w1', 'w2')], ids\n"
             "print('loaded', type(tokenizer).__name__)\n")
    loads = {
        "no package, AutoTokenizer with trust_remote_code":
            NO_PACKAGE + "from transformers import AutoTokenizer\n"
            f"tokenizer = AutoTokenizer.from_pretrained({str(tmp_path / 'saved')!r}, trust_remote_code=True)\n",
        "no package, no code at all":
            NO_PACKAGE + "from transformers import PreTrainedTokenizerFast\n"
            f"tokenizer = PreTrainedTokenizerFast.from_pretrained({str(tmp_path / 'saved')!r})\n",
        "package imported, plain AutoTokenizer":
            "import sfrnn_hf\nfrom transformers import AutoTokenizer\n"
            f"tokenizer = AutoTokenizer.from_pretrained({str(tmp_path / 'saved')!r})\n",
    }
    for how, code in loads.items():
        output = run_as_user(tmp_path, code + check)
        assert "loaded" in output and PROMPT_TEXT not in output and "model of type" not in output, (how, output)


@pytest.mark.xfail(strict=True, reason="transformers 5.23: AutoTokenizer reads config.json first and asks before "
                                       "loading a config whose auto_map names remote code; documented in the card")
def test_plain_auto_tokenizer_without_the_package_does_not_ask(tmp_path, word_tokenizer):
    model = SfrnnForCausalLM(SfrnnConfig(vocab_size=len(word_tokenizer), hidden_size=8))
    folder = export_for_hub(model, word_tokenizer, tmp_path / "hub", repo_id="someone/sfrnn-test")
    output = run_as_user(tmp_path, NO_PACKAGE + "from transformers import AutoTokenizer\n"
                                                f"AutoTokenizer.from_pretrained({str(folder)!r})\n")
    assert PROMPT_TEXT not in output and "model of type" not in output


def _run_folder(folder, tokenizer, dataset="ptb", seed=0):
    """What `sfrnn-train` leaves: the final model and tokenizer, `results.json`, `experiment.yaml`."""
    torch.manual_seed(seed)
    SfrnnForCausalLM(SfrnnConfig(vocab_size=len(tokenizer), hidden_size=8)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "results.json").write_text(json.dumps({"validation_perplexity": 150.25, "test_perplexity": 140.5}))
    (folder / "experiment.yaml").write_text(yaml.safe_dump({"data": {"dataset": dataset}}))
    return folder


def _contents(folder):
    return {path.relative_to(folder): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def test_the_commands_help_examples_run_taking_the_dataset_from_the_run(tmp_path, word_tokenizer, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    demo = _run_folder(tmp_path / "demo", word_tokenizer)
    examples = [line.split("#")[0].split()[1:] for line in export_module.__doc__.splitlines()
                if line.strip().startswith("sfrnn-export ")]
    assert len(examples) == 2
    for argv in examples:
        argv = [str(demo) if arg == "outputs/demo" else str(tmp_path / arg) if arg.startswith("hub/") else arg
                for arg in argv]
        assert export_module.main(argv) == (1 if "--repo-id" in argv else 0)  # 1: offline, not uploaded
        card = ModelCard.load(Path(argv[1]) / "README.md")
        assert {r.dataset_split: r.metric_value for r in card.data.eval_results} == {"validation": 150.25, "test": 140.5}
        assert {r.dataset_name for r in card.data.eval_results} == {"Penn Treebank"}


@pytest.mark.parametrize("dataset", ["ptb_char", "ptb"])
def test_the_card_of_a_character_level_run_gives_bits_per_character(tmp_path, word_tokenizer, dataset):
    run = _run_folder(tmp_path / "run", word_tokenizer, dataset=dataset)
    assert export_module.main([str(run), str(tmp_path / "hub")]) == 0
    card = (tmp_path / "hub" / "README.md").read_text()
    rows = {line.split("|")[1].strip(): [cell.strip(" *") for cell in line.split("|")[2:-1]]
            for line in card.splitlines() if line.startswith(("| validation |", "| test |"))}
    if dataset == "ptb":  # a token is a word: perplexity only
        assert "bits per character" not in card and rows == {"validation": ["150.25"], "test": ["140.50"]}
        return
    assert "| split | perplexity | bits per character |" in card
    for split, perplexity in (("validation", 150.25), ("test", 140.5)):  # bits per character = log2(perplexity)
        assert rows[split] == [f"{perplexity:.4f}", f"{math.log2(perplexity):.4f}"]


def test_a_failed_or_repeated_export_never_leaves_a_folder_that_mixes_two(tmp_path, word_tokenizer, monkeypatch):
    first = _run_folder(tmp_path / "first", word_tokenizer)
    out = tmp_path / "hub"
    assert export_module.main([str(first), str(out), "--dataset", "ptb_text_only"]) == 0
    before = _contents(out)
    second = tmp_path / "second"  # another model, no tokenizer, no measured perplexity
    torch.manual_seed(1)
    SfrnnForCausalLM(SfrnnConfig(vocab_size=len(word_tokenizer), hidden_size=8)).save_pretrained(second)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # stopped after the weights were written, before the card

    monkeypatch.setattr(ModelCard, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        export_module.main([str(second), str(out)])
    monkeypatch.undo()
    assert _contents(out) == before and [path.name for path in tmp_path.iterdir() if path.name.startswith(".")] == []
    assert export_module.main([str(second), str(out)]) == 0
    after = _contents(out)
    assert after[Path("model.safetensors")] == (second / "model.safetensors").read_bytes()
    assert not any(name.name.startswith("tokenizer") for name in after)  # not the first export's tokenizer
    assert "150.25" not in after[Path("README.md")].decode()  # nor its perplexity
    (out / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="notes.txt"):
        export_module.main([str(first), str(out)])
    assert _contents(out) == {**after, Path("notes.txt"): b"mine"}


def test_export_checks_every_input_before_writing_anything(tmp_path, word_tokenizer):
    local = _run_folder(tmp_path / "local", word_tokenizer, dataset="text")
    with pytest.raises(SystemExit, match="--dataset"):  # a perplexity on local files names no Hub dataset
        export_module.main([str(local), str(tmp_path / "out")])
    with pytest.raises(SystemExit, match="--tokenizer.*no tokenizer"):
        export_module.main([str(local), str(tmp_path / "out"), "--tokenizer", str(tmp_path), "--dataset", "x"])
    checkpoint = _run_folder(tmp_path / "checkpoint-4", word_tokenizer)
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 4, "log_history": []}))
    write_manifest(str(checkpoint))
    assert export_module.main([str(checkpoint), str(tmp_path / "intact"), "--dataset", "ptb_text_only"]) == 0
    weights = checkpoint / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x5A
    weights.write_bytes(bytes(data))
    with pytest.raises(SystemExit, match="checkpoint-4 is not an intact checkpoint.*checksum"):
        export_module.main([str(checkpoint), str(tmp_path / "out"), "--dataset", "ptb_text_only"])
    (checkpoint / MANIFEST).unlink()  # an sfrnn-train checkpoint never sealed
    with pytest.raises(SystemExit, match="not an intact checkpoint.*manifest"):
        export_module.main([str(checkpoint), str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("edited", ["modeling_sfrnn.py", "lora_targets.py"])  # every code file the folder ships
def test_a_folder_whose_code_differs_from_the_code_that_loads_it_gets_a_warning(tmp_path, word_tokenizer, caplog, edited):
    model = SfrnnForCausalLM(SfrnnConfig(vocab_size=len(word_tokenizer), hidden_size=8))
    folder = export_for_hub(model, word_tokenizer, tmp_path / "hub", datasets=["ptb_text_only"])
    with caplog.at_level("WARNING", logger="sfrnn_hf.modeling_sfrnn"):
        AutoModelForCausalLM.from_pretrained(folder)
    assert not [r for r in caplog.records if ".py" in r.getMessage()]  # as saved: silent
    with open(folder / edited, "a") as handle:
        handle.write("\nEDITED = True\n")
    with caplog.at_level("WARNING", logger="sfrnn_hf.modeling_sfrnn"):
        AutoModelForCausalLM.from_pretrained(folder)  # the installed package's code runs
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert f"{edited} changed after the model was saved" in messages
    assert f"{edited} differ from the code running now" in messages
    remote = textwrap.dedent("""
        import sys
        sys.modules["sfrnn_hf"] = None
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    """)
    done = subprocess.run([sys.executable, "-c", remote, str(folder)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")})
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"{edited} changed after the model was saved" in done.stderr  # the folder's own code runs: it says so
