"""LoRA fine-tuning: an adapter on the recurrent weights (PEFT `target_parameters`) changes the recurrence itself, its
DSF gradient is the chain rule of the DSF gradient of a model holding the merged weights, adapters save, load and
merge, and `--lora` fine-tunes a trained checkpoint through the training command."""

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from sfrnn_hf import CELL_TYPES, SfrnnConfig, SfrnnForCausalLM
from sfrnn_hf.lora_targets import recurrent_lora_parameters
from sfrnn_hf.training.train import apply_lora, main, run
from sfrnn_hf.training.config import ConfigError, LoraSection, load_config
from training_helpers import tiny_experiment

peft = pytest.importorskip("peft")
from peft import PeftModel  # noqa: E402
from peft.tuners.lora.layer import ParamWrapper  # noqa: E402

VOCAB = 29


def _adapted_model(cell="gru", block="prenorm", mode="dsf"):
    config = SfrnnConfig(vocab_size=VOCAB, hidden_size=8, num_hidden_layers=2, cell_type=cell, block_type=block,
                         gradient_mode=mode)
    base = SfrnnForCausalLM(config).double()
    matrices = list(recurrent_lora_parameters(cell))  # weight_ih, and weight_hh where a matrix
    section = LoraSection(enabled=True, r=3, alpha=6, target_parameters=matrices,
                          target_modules=["output_projection"] if block == "prenorm" else [])
    adapted = apply_lora(copy.deepcopy(base), section)
    with torch.no_grad():  # PEFT starts B at 0 (an identity adapter): give it a real update
        for name, parameter in adapted.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.3)
    return base, adapted


def _batch():
    input_ids = torch.randint(0, VOCAB, (3, 10))
    mask = torch.ones_like(input_ids)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    return {"input_ids": input_ids, "attention_mask": mask, "labels": input_ids.masked_fill(mask == 0, -100)}


@pytest.mark.parametrize("cell", CELL_TYPES)
def test_adapted_forward_is_the_merged_forward_and_not_the_base(cell):
    base, adapted = _adapted_model(cell)
    batch = _batch()
    merged = copy.deepcopy(adapted).merge_and_unload()
    assert type(merged) is SfrnnForCausalLM
    for mode in ("bptt", "dsf"):  # the no-grad path and the training path both read the adapted weights
        for model in (base, adapted, merged):
            model.config.gradient_mode = mode
        with torch.no_grad():
            want = merged.eval()(**batch).logits
            got_eval = adapted.eval()(**batch).logits
        got_train = adapted.train()(**batch, return_logits=True).logits.detach()
        assert (got_eval - base.eval()(**batch).logits).abs().max() > 1e-2  # the recurrence really changed
        torch.testing.assert_close(got_eval, want, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(got_train, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("block", ["residual", "prenorm"])
def test_adapter_dsf_gradient_is_the_chain_rule_of_the_merged_dsf_gradient(block):
    base, adapted = _adapted_model(block=block)
    batch = _batch()
    merged = copy.deepcopy(adapted).merge_and_unload().requires_grad_(True)  # (PEFT froze the base weights)
    adapted.train()(**batch).loss.backward()
    merged.train()(**batch).loss.backward()
    wrappers = [m for m in adapted.modules() if isinstance(m, ParamWrapper)]
    assert sorted({w.parameter_name for w in wrappers}) == ["weight_hh", "weight_ih"] and len(wrappers) == 4
    linear = [m for name, m in adapted.named_modules() if name.endswith("output_projection")]
    checked = 0
    for layer_index in range(2):
        merged_block = merged.model.layers[layer_index]
        owners = [(w, getattr(merged_block.recurrent, w.parameter_name)) for w in wrappers
                  if w in list(adapted.base_model.model.model.layers[layer_index].modules())]
        if block == "prenorm":
            owners.append((linear[layer_index], merged_block.output_projection.weight))
        for wrapper, merged_weight in owners:
            G = merged_weight.grad  # DSF gradient wrt the merged weight (out, in)
            A, B = wrapper.lora_A["default"].weight, wrapper.lora_B["default"].weight  # (r, in), (out, r)
            scaling = wrapper.scaling["default"]
            torch.testing.assert_close(B.grad, scaling * G @ A.T, rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(A.grad, scaling * B.T @ G, rtol=1e-9, atol=1e-12)
            checked += 1
    assert checked == (6 if block == "prenorm" else 4)
    # Only the adapters train.
    assert all(("lora_" in name) == p.requires_grad for name, p in adapted.named_parameters())


def test_adapters_save_load_and_merge(tmp_path):
    base, adapted = _adapted_model()
    batch = _batch()
    adapted.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").exists()
    assert json.load(open(tmp_path / "adapter_config.json"))["target_parameters"] == [
        "recurrent.weight_ih", "recurrent.weight_hh"]
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    with torch.no_grad():
        want = adapted.eval()(**batch).logits
        torch.testing.assert_close(loaded(**batch).logits, want, rtol=0, atol=0)
        merged = loaded.merge_and_unload()
        assert isinstance(merged, SfrnnForCausalLM)
        torch.testing.assert_close(merged(**batch).logits, want, rtol=1e-10, atol=1e-10)


def test_lora_option_fine_tunes_a_trained_checkpoint(tmp_path, capsys):
    base_run, _ = run(tiny_experiment(tmp_path / "base", "training.max_steps=2"))
    checkpoint = tmp_path / "base" / "run"
    base_state = {k: v.clone() for k, v in AutoModelForCausalLM.from_pretrained(checkpoint).state_dict().items()}
    experiment = tiny_experiment(tmp_path / "lora", "training.max_steps=3", "lora.enabled=true", "lora.r=2",
                                 f"model.from_pretrained={checkpoint}", "model.gradient_mode=dsf")
    experiment.model = {"from_pretrained": str(checkpoint), "gradient_mode": "dsf"}
    trainer, results = run(experiment)
    out = tmp_path / "lora" / "run"
    assert (out / "adapter_model.safetensors").exists() and (out / "adapter_config.json").exists()
    peft_model = trainer.model
    trainable = [name for name, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    # The base weights did not move; the adapters did.
    for name, tensor in peft_model.get_base_model().state_dict().items():
        if name in base_state:
            torch.testing.assert_close(tensor, base_state[name], rtol=0, atol=0)
    assert any(p.abs().max() > 0 for n, p in peft_model.named_parameters() if "lora_B" in n)
    # The merged model is an ordinary checkpoint computing what the adapted model computes.
    merged = AutoModelForCausalLM.from_pretrained(results["merged_model"]).eval()
    batch = _batch()
    batch = {k: v.clamp(max=merged.config.vocab_size - 1) if k != "attention_mask" else v for k, v in batch.items()}
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, peft_model.eval()(**batch).logits, rtol=1e-5, atol=1e-6)
    # The command line's --lora takes the same route (here stopped at the config print).
    assert main(["ptb_gru_1x256", "--lora", str(checkpoint), "--print-config"]) == 0
    assert "enabled: true" in capsys.readouterr().out


@pytest.mark.parametrize("cell", CELL_TYPES)
def test_the_lora_section_defaults_to_the_recurrent_matrices_the_cell_has(tmp_path, cell):
    model = SfrnnForCausalLM(SfrnnConfig(vocab_size=VOCAB, hidden_size=8, cell_type=cell))
    model.save_pretrained(tmp_path)
    experiment = load_config(None, ["lora.enabled=true", f"model.from_pretrained={tmp_path}"])
    recurrent = model.model.layers[0].recurrent  # the matrices this model's layers hold
    assert experiment.lora.target_parameters == [  # explicit in the run's experiment.yaml
        name for name in ("weight_ih", "weight_hh") if getattr(recurrent, name).dim() == 2
        and getattr(recurrent, name).numel()]
    assert experiment.to_dict()["lora"]["target_parameters"] == experiment.lora.target_parameters
    if "weight_hh" not in experiment.lora.target_parameters:  # asked for explicitly: refused, naming the cell
        with pytest.raises(ConfigError, match=f"weight_hh.*{cell}"):
            load_config(None, ["lora.enabled=true", f"model.from_pretrained={tmp_path}",
                               "lora.target_parameters=[weight_ih, weight_hh]"])


def test_lora_option_fine_tunes_a_cell_without_a_recurrent_matrix(tmp_path):
    run(tiny_experiment(tmp_path / "base", "training.max_steps=1", "model.cell_type=indrnn"))
    checkpoint = tmp_path / "base" / "run"
    experiment = tiny_experiment(tmp_path / "lora", "training.max_steps=2", "lora.enabled=true", "lora.r=2",
                                 f"model.from_pretrained={checkpoint}")
    experiment.model = {"from_pretrained": str(checkpoint)}
    trainer, _ = run(experiment)
    assert json.load(open(tmp_path / "lora" / "run" / "adapter_config.json"))["target_parameters"] == [
        "recurrent.weight_ih"]
    adapters = [p for name, p in trainer.model.named_parameters() if "lora_B" in name]
    assert len(adapters) == 2 and all(p.abs().max() > 0 for p in adapters)  # one matrix in each of the 2 layers, trained
