"""A PEFT-wrapped sfrnn model prints (PEFT swaps `recurrent` for its own wrapper), and a checkpoint loaded as remote
code, where sfrnn_hf is not installed, knows its LoRA defaults: `LoraConfig(task_type="CAUSAL_LM")` without targets
and `target_modules="all-linear"` adapt every layer's recurrent matrices there too, the ones its model card names."""

import ast
import re

import pytest
import torch

from sfrnn_hf import SfrnnConfig, SfrnnForCausalLM
from sfrnn_hf.training.export import export_for_hub
from test_hub_export import NO_PACKAGE, run_as_user

peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model  # noqa: E402


def tiny(block="residual"):
    return SfrnnForCausalLM(SfrnnConfig(vocab_size=19, hidden_size=8, num_hidden_layers=2, block_type=block))


@pytest.mark.parametrize("targets", [{}, {"target_modules": "all-linear"}])
def test_a_peft_model_prints_every_block(targets):
    text = repr(get_peft_model(tiny(block="prenorm"), LoraConfig(task_type="CAUSAL_LM", **targets)))
    assert "layer_idx=0, block_type=prenorm" in text and "layer_idx=1, block_type=prenorm" in text
    assert text.count("gradient_mode=dsf") == 2  # each wrapped recurrent layer still shows its own description


REMOTE_LORA = """
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora.layer import ParamWrapper
from transformers import AutoModelForCausalLM

for targets in ({}, {"target_modules": "all-linear"}):
    model = AutoModelForCausalLM.from_pretrained(FOLDER, trust_remote_code=True)
    assert "sfrnn_hf" not in type(model).__module__, type(model).__module__
    adapted = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **targets))
    wrapped = sorted((name.split(".layers.")[1].split(".")[0], module.parameter_name)
                     for name, module in adapted.named_modules() if isinstance(module, ParamWrapper))
    print("wrapped", targets, wrapped)
    print("printed", "layer_idx=1" in repr(adapted))
"""


@pytest.mark.parametrize("cell", ["gru", "indrnn"])  # both recurrent matrices; weight_ih only (a vector weight_hh)
def test_lora_defaults_through_remote_code_without_the_package(tmp_path, word_tokenizer, cell):
    model = SfrnnForCausalLM(SfrnnConfig(vocab_size=len(word_tokenizer), hidden_size=8, num_hidden_layers=2,
                                         cell_type=cell))
    folder = export_for_hub(model, word_tokenizer, tmp_path / "hub", repo_id="someone/sfrnn-test")
    card = (folder / "README.md").read_text()
    stated = ast.literal_eval(re.search(r"target_parameters=(\[[^\]]*\])", card).group(1))
    output = run_as_user(tmp_path, NO_PACKAGE + f"FOLDER = {str(folder)!r}\n" + REMOTE_LORA)
    wrapped = str(sorted((str(layer), name.split(".")[-1]) for layer in range(2) for name in stated))
    assert f"wrapped {{}} {wrapped}" in output, output[-3000:]
    assert f"wrapped {{'target_modules': 'all-linear'}} {wrapped}" in output, output[-3000:]
    assert output.count("printed True") == 2, output[-3000:]
