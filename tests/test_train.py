"""The training command: the loss falls in every gradient mode, the paper's optimiser and schedules, the outputs of a
run, and bad configs or paths rejected before training starts with a message naming the problem."""

import json
import math

import pytest
import torch
import yaml
from huggingface_hub.errors import StrictDataclassFieldValidationError
from transformers import AutoModelForCausalLM, AutoTokenizer

from sfrnn_hf.training.config import ConfigError, load_config, shipped_configs, trainer_default
from sfrnn_hf.training.run_folder import changed_settings
from sfrnn_hf.training.train import experiment_yaml, main, run, training_arguments
from training_helpers import logged_losses, tiny_experiment


@pytest.mark.parametrize("mode", ["bptt", "dsf", "ft_bptt"])
def test_trainer_loss_falls_in_every_gradient_mode(tmp_path, mode):
    # One batch holding the whole (tiny) training set, seen at every step: the loss must fall steadily.
    experiment = tiny_experiment(tmp_path, f"model.gradient_mode={mode}", "data.max_train_samples=8",
                                 "training.max_steps=12", "training.lr=3.0e-2")
    trainer, _ = run(experiment)
    losses = logged_losses(trainer)
    assert trainer.model.config.gradient_mode == mode
    assert len(losses) == 12
    assert losses[12] < losses[1] - 0.4, losses  # from ln(vocab) ~ 3.2


def test_run_writes_best_model_tokenizer_curves_and_results(tmp_path):
    experiment = tiny_experiment(tmp_path, "training.max_steps=6", "training.eval_strategy=steps",
                                 "training.eval_steps=3", "training.trainer_args.save_strategy=steps", validation=True)
    trainer, results = run(experiment)
    out = tmp_path / "run"
    curves = [json.loads(line) for line in open(out / "log_history.jsonl")]
    evaluations = [entry for entry in curves if "eval_perplexity" in entry]
    assert [entry["step"] for entry in evaluations] == [3, 6]
    assert sum("loss" in entry for entry in curves) == 6
    best = min(evaluations, key=lambda entry: entry["eval_perplexity"])
    assert results["best_checkpoint"].endswith(f"checkpoint-{best['step']}")
    assert results["validation_perplexity"] == pytest.approx(best["eval_perplexity"], rel=1e-5)
    assert json.load(open(out / "results.json"))["validation_perplexity"] == results["validation_perplexity"]
    # The saved model is the best one, loadable through the Auto classes with its tokenizer.
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    batch = trainer.data_collator([trainer.eval_dataset[i] for i in range(len(trainer.eval_dataset))])
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    # Independent perplexity: total NLL over predicted tokens of the whole validation set.
    labels = batch["labels"][:, 1:]
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels, ignore_index=-100, reduction="sum")
    assert math.exp(nll.item() / (labels != -100).sum().item()) == pytest.approx(best["eval_perplexity"], rel=1e-4)
    assert len(tokenizer) == model.config.vocab_size


def _lrs(trainer):
    return [entry["learning_rate"] for entry in trainer.state.log_history if "learning_rate" in entry]


def test_adam_with_coupled_weight_decay_and_step_schedule(tmp_path):
    experiment = tiny_experiment(tmp_path, "training.max_steps=9", "training.scheduler=step",
                                 "training.step_every=0.3333333333333333", "training.step_gamma=0.1",
                                 "training.weight_decay=1.0e-4")
    trainer, _ = run(experiment)
    optimizer = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    assert type(optimizer) is torch.optim.Adam  # plain Adam: decay added to the gradient, not decoupled (AdamW)
    covered = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert covered == {id(p) for p in trainer.model.parameters()}
    assert all(group["weight_decay"] == 1e-4 for group in optimizer.param_groups if group["params"])
    # StepLR: x0.1 after each third of the run (the paper's 10 of 30 epochs).
    assert _lrs(trainer) == pytest.approx([1e-2] * 3 + [1e-3] * 3 + [1e-4] * 3)


def test_warmup_then_cosine_to_a_tenth(tmp_path):
    trainer, _ = run(tiny_experiment(tmp_path, "training.max_steps=20", "training.scheduler=warmup_cosine",
                                     "training.warmup_ratio=0.1", "training.min_lr_ratio=0.1"))
    lrs = _lrs(trainer)  # lrs[k]: the learning rate of step k + 1, i.e. the schedule's value after k steps
    peak = 1e-2
    assert lrs[:3] == pytest.approx([0.0, peak / 2, peak])  # 2 warm-up steps (10% of 20)
    for k, lr in enumerate(lrs[2:], start=2):
        assert lr == pytest.approx(peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (k - 2) / 18))))
    assert trainer.lr_scheduler.get_last_lr()[0] == pytest.approx(0.1 * peak)  # the end of the run: 0.1 x lr


def test_gradient_clipping_bounds_the_applied_gradient(tmp_path):
    from transformers import TrainerCallback

    norms = []

    class GradientNorm(TrainerCallback):  # called after clipping, before the optimizer step
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            norms.append(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])).item())

    trainer, _ = run(tiny_experiment(tmp_path, "training.max_grad_norm=0.01", "training.max_steps=3"),
                     callbacks=[GradientNorm()])
    before = [entry["grad_norm"] for entry in trainer.state.log_history if "grad_norm" in entry]
    assert len(norms) == len(before) == 3
    assert all(b > 0.05 for b in before)  # the raw gradients were larger than the bound...
    assert norms == pytest.approx([0.01] * 3, rel=1e-4)  # ...and the applied ones were clipped to it


def test_every_shipped_config_loads():
    names = shipped_configs()
    ptb = [n for n in names if n.startswith("ptb_")]
    wikitext = [n for n in names if n.startswith("wt103_")]
    assert sorted(ptb) == ["ptb_char_gru_1x512", "ptb_gru_1x1024", "ptb_gru_1x256", "ptb_gru_3x1024", "ptb_gru_3x256"]
    # depth {1,3,6,12} x 512, width {128,256,512,1024} x 3 layers, cells at 3 x 512, context 1024
    assert sorted(wikitext) == sorted(["wt103_gru_1x512", "wt103_gru_3x512", "wt103_gru_6x512", "wt103_gru_12x512",
                                       "wt103_gru_3x128", "wt103_gru_3x256", "wt103_gru_3x1024", "wt103_rnn_3x512",
                                       "wt103_lstm_3x512", "wt103_gru_3x512_ctx1024"])
    char = load_config("ptb_char_gru_1x512")  # the character-level study (docs/results.md, "What DSF buys")
    assert (char.data.dataset, char.data.sequences, char.data.max_length) == ("ptb_char", "stream", 128)
    assert (char.trainer_args["num_train_epochs"], char.training.batch_size, char.model["hidden_size"]) == (6, 128, 512)
    for name in (n for n in ptb if n.startswith("ptb_gru_")):  # the paper's word-level protocol
        config = load_config(name)
        trainer_args = config.trainer_args
        assert (trainer_args["num_train_epochs"], config.training.batch_size, trainer_args["learning_rate"]) == (
            30, 128, 1e-3)
        assert (trainer_args["weight_decay"], config.training.scheduler) == (1e-4, "step")
        assert (config.data.max_length, config.model["block_type"]) == (65, "residual")
    for name in wikitext:
        config = load_config(name, ["data.dataset=text", f"data.train_files=[{__file__}]"])  # offline here
        assert (config.data.bpe_vocab_size, config.training.scheduler, config.model["block_type"]) == (
            16000, "warmup_cosine", "prenorm")
        rnn = config.model["cell_type"] == "rnn"
        assert (config.trainer_args["learning_rate"], config.trainer_args["max_grad_norm"]) == (
            (5e-4, 1.0) if rnn else (1e-3, 0.0))
        assert config.trainer_args["num_train_epochs"] == (20 if name.endswith("ctx1024") else 5)
        assert config.data.max_length == (1024 if name.endswith("ctx1024") else 256)


BAD = [
    (["data.dataset=ptb2"], "data.dataset"),
    (["data.dataset=text", "data.train_files=[/nonexistent/train.txt]"], "/nonexistent/train.txt"),
    (["model.cell_type=transformer"], "cell_type"),
    (["model.gradient_mode=dfs"], "gradient_mode"),
    (["model.hidden_size=-8"], "hidden_size"),
    (["model.num_hidden_layers=0"], "num_hidden_layers"),
    (["model.hiden_size=8"], "hiden_size"),
    (["training.learning_rate=0"], "training.learning_rate"),
    (["training.lr=-1"], "training.lr"),  # an earlier config's name: the error names it as given
    (["training.adam_beta2=1.0"], "training.adam_beta2"),
    (["training.eval_strategy=epoc"], "Did you mean 'epoch'"),
    (["training.per_device_train_batch_size=4"], "set by `training.batch_size`"),
    (["training.step_every=0"], "training.step_every"),
    (["data.max_length=1"], "data.max_length"),
    (["training.batch_size=-4"], "training.batch_size"),
    (["training.trainer_args.not_an_argument=1"], "not_an_argument"),
    (["data.tokenizer=/nonexistent/tokenizer"], "/nonexistent/tokenizer"),
    (["model.from_pretrained=/nonexistent/checkpoint"], "/nonexistent/checkpoint"),
    (["training.scheduler=linear"], "training.scheduler"),
    (["optimiser.lr=1"], "optimiser"),
    (["data.dataset=wikitext-103"], "HF_DATASETS_OFFLINE"),
]


@pytest.mark.parametrize("overrides, named", BAD, ids=[b[1] for b in BAD])
def test_bad_config_fails_before_training_naming_the_problem(tmp_path, capsys, overrides, named):
    out = tmp_path / "run"
    argv = ["ptb_gru_1x256", f"training.output_dir={out}", *overrides]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    assert "sfrnn-train: error:" in message and named in message, message
    assert not out.exists()  # nothing was started


def test_missing_config_file_and_lora_without_checkpoint(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main([str(tmp_path / "missing.yaml")])
    assert "missing.yaml" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="from_pretrained"):
        load_config("ptb_gru_1x256", ["lora.enabled=true"])
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="bias_hh"):
        load_config("ptb_gru_1x256", ["lora.enabled=true", f"model.from_pretrained={tmp_path}",
                                      "lora.target_parameters=[bias_hh]"])
    (tmp_path / "config.json").write_text("{damaged")  # the base model's cell decides the LoRA defaults
    with pytest.raises(ConfigError, match="model.from_pretrained.*not a valid JSON"):
        load_config("ptb_gru_1x256", ["lora.enabled=true", f"model.from_pretrained={tmp_path}"])


def test_overrides_are_typed_and_cli_forms_agree():
    a = load_config("ptb_gru_1x256", ["training.learning_rate=5e-4", "model.gradient_mode=bptt",
                                      "training.eval_strategy=no"])
    learning_rate = a.trainer_args["learning_rate"]
    assert learning_rate == 5e-4 and isinstance(learning_rate, float)  # YAML reads `5e-4` as a string
    assert a.model["gradient_mode"] == "bptt" and a.trainer_args["eval_strategy"] == "no"  # YAML reads `no` as false
    with pytest.raises(ConfigError, match="training.epochs"):
        load_config("ptb_gru_1x256", ["training.epochs=many"])


def test_the_model_section_is_read_against_the_fields_of_sfrnnconfig():
    config = load_config(None, ["model.feedback_max=5e-1", "model.feedback_min=0"])  # no file: every default
    assert config.model == {"feedback_max": 0.5, "feedback_min": 0.0}  # YAML reads `5e-1` as a string
    assert config.trainer_args["learning_rate"] == trainer_default("learning_rate")
    for overrides, message in [(["model.gradient_mode=dfs"], r"model.gradient_mode.*'dfs'.*Did you mean 'dsf'"),
                               (["model.feedback_max=1.5"], r"model.feedback_max. must be in \[0, 1\], got 1.5"),
                               (["model.hidden_size=8.5"], r"model.hidden_size. must be int, got 8.5"),
                               (["model.cell_type=gru", "model.lstm_expose_cell_state=true"],  # a rule between fields
                                r"lstm_expose_cell_state=True.*'gru'")]:
        with pytest.raises(ConfigError, match=message):
            load_config(None, overrides)


def test_changed_settings_names_what_a_resume_would_change():
    started = load_config("ptb_gru_1x256").to_dict()
    resumed = load_config("ptb_gru_1x256", ["training.trainer_args.train_sampling_strategy=group_by_length",
                                            "model.hidden_size=8", "training.logging_steps=7",
                                            "training.resume_from_checkpoint=true"]).to_dict()
    assert changed_settings(started, resumed) == [  # a field the record lacks: transformers' default
        "model.hidden_size: 256 -> 8", "training.train_sampling_strategy: 'random' -> 'group_by_length'"]
    assert changed_settings(resumed, resumed) == []


# What `experiment.yaml` held for the PTB protocol's dsf_calibrated run (examples/run_ptb_protocol.sh), written before
# the `training` section took TrainingArguments' own names: a resume compares it, key by key, with its own settings.
PROTOCOL_EXPERIMENT_YAML = """\
model:
  cell_type: gru
  num_hidden_layers: 1
  hidden_size: 256
  block_type: residual
  gradient_mode: dsf
  feedback_type: calibrated
data:
  dataset: ptb
  sequences: sentence
  max_length: 65
  tokenizer: word
  bpe_vocab_size: 16000
  train_files: null
  validation_files: null
  test_files: null
  max_train_samples: null
  max_eval_samples: null
  num_proc: null
training:
  output_dir: runs/ptb_protocol/dsf
  epochs: 30.0
  max_steps: -1
  batch_size: 128
  gradient_accumulation_steps: 1
  eval_batch_size: null
  lr: 0.001
  weight_decay: 0.0001
  adam_beta1: 0.9
  adam_beta2: 0.999
  adam_eps: 1.0e-08
  scheduler: step
  step_every: 0.3333333333333333
  step_gamma: 0.1
  warmup_ratio: 0.1
  min_lr_ratio: 0.1
  max_grad_norm: 0.0
  seed: 0
  bf16: false
  gradient_checkpointing: false
  eval_strategy: epoch
  eval_steps: null
  save_total_limit: 2
  logging_steps: 50
  resume_from_checkpoint: true
  overwrite_output_dir: false
  report_to: none
  dataloader_num_workers: 0
  evaluate_test: true
  gradient_mode_schedule: []
  trainer_args:
    restore_callback_states_from_checkpoint: true
    disable_tqdm: true
lora:
  enabled: false
  r: 8
  alpha: 16
  target_parameters:
  - weight_ih
  - weight_hh
  target_modules: []
  merge_at_end: true
"""


def test_a_long_run_recorded_under_the_earlier_names_resumes_with_no_change():
    settings = ["model.gradient_mode=dsf", "model.feedback_type=calibrated", "training.output_dir=runs/ptb_protocol/dsf",
                "training.save_total_limit=2", "training.restore_callback_states_from_checkpoint=true",
                "training.report_to=none", "training.disable_tqdm=true", "training.resume_from_checkpoint=true"]
    recorded = yaml.safe_load(PROTOCOL_EXPERIMENT_YAML)
    experiment = load_config("ptb_gru_1x256", settings)
    assert changed_settings(recorded, experiment.to_dict()) == []
    today = load_config("ptb_gru_1x256", ["model.gradient_mode=dsf_calibrated", *settings[2:]])  # one axis
    assert today.model["gradient_mode"] == "dsf_calibrated" and changed_settings(recorded, today.to_dict()) == []
    assert changed_settings(recorded, load_config("ptb_gru_1x256", settings + ["training.seed=1"]).to_dict()) == [
        "training.seed: 0 -> 1"]
    # the earlier record, read as a config file, is the same run; today's record loads back to itself
    assert changed_settings(load_config_text(PROTOCOL_EXPERIMENT_YAML).to_dict(), experiment.to_dict()) == []
    assert load_config_text(experiment_yaml(experiment)).to_dict() == experiment.to_dict()


def load_config_text(text: str):
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as handle:
        handle.write(text)
        handle.flush()
        return load_config(handle.name)


def test_training_takes_every_trainer_argument_by_its_own_name_and_earlier_names():
    direct = load_config("ptb_gru_1x256", ["training.save_strategy=no", "training.disable_tqdm=true"])
    nested = load_config("ptb_gru_1x256", ["training.trainer_args.save_strategy=no",
                                           "training.trainer_args.disable_tqdm=true"])
    assert (direct.trainer_args["save_strategy"], direct.trainer_args["disable_tqdm"]) == ("no", True)  # `no`: false
    assert direct.to_dict() == nested.to_dict()  # one record: a resume sees no change between the two spellings
    earlier = load_config(None, ["training.lr=0.01", "training.epochs=3", "training.adam_eps=1e-6",
                                 "training.eval_batch_size=4", "training.gradient_checkpointing=true"])
    today = load_config(None, ["training.learning_rate=0.01", "training.num_train_epochs=3",
                               "training.adam_epsilon=1e-6", "training.per_device_eval_batch_size=4",
                               "training.activation_checkpointing=true"])
    assert earlier.to_dict() == today.to_dict()
    assert load_config("ptb_gru_1x256", ["training.epochs=3"]).trainer_args["num_train_epochs"] == 3  # overrides
    assert load_config(None, ["training.save_steps=3", "training.trainer_args.save_steps=4"]).trainer_args[
        "save_steps"] == 4  # the later override wins, whatever its spelling
    with pytest.raises(ConfigError, match="is given twice"):  # one file, two spellings
        load_config_text("training:\n  epochs: 3\n  num_train_epochs: 4\n")
    with pytest.raises(ConfigError, match=r"`training\.lr_scheduler_type` is set by `training\.scheduler`"):
        load_config(None, ["training.trainer_args.lr_scheduler_type=linear"])
    with pytest.raises(ConfigError, match="Did you mean 'save_steps'.*any other transformers.TrainingArguments"):
        load_config(None, ["training.save_stepz=3"])


def test_every_training_key_reaches_training_arguments_under_its_name(tmp_path):
    experiment = load_config(None, [
        f"training.output_dir={tmp_path}", "training.num_train_epochs=2.5", "training.max_steps=9",
        "training.batch_size=8", "training.gradient_accumulation_steps=2", "training.learning_rate=0.0123",
        "training.weight_decay=0.01", "training.adam_beta1=0.8", "training.adam_beta2=0.99",
        "training.adam_epsilon=1e-7", "training.max_grad_norm=0.5", "training.seed=7",
        "training.activation_checkpointing=true", "training.eval_strategy=steps", "training.eval_steps=4",
        "training.save_total_limit=5", "training.logging_steps=3", "training.scheduler=warmup_cosine",
        "training.warmup_ratio=0.2", "training.per_device_eval_batch_size=3", "training.report_to=none",
        "training.save_strategy=steps"])
    args = training_arguments(experiment, has_validation=True, world_size=1)
    for name, value in experiment.trainer_args.items():
        if name != "report_to":
            assert getattr(args, name) == value, name
    assert (args.num_train_epochs, args.learning_rate, args.adam_epsilon, args.seed) == (2.5, 0.0123, 1e-7, 7)
    assert (args.per_device_train_batch_size, args.per_device_eval_batch_size) == (4, 3)  # 8 = 4 x 2 accumulated
    assert (args.lr_scheduler_type, args.warmup_steps, args.lr_scheduler_kwargs) == (
        "cosine_with_min_lr", 0.2, {"min_lr_rate": 0.1})
    assert (args.eval_strategy, args.load_best_model_at_end, args.metric_for_best_model) == ("steps", True, "perplexity")
    assert (args.save_strategy, args.save_steps, args.report_to) == ("steps", 4, [])
    # the package's defaults where they differ from transformers' (the paper's protocol)
    default = training_arguments(load_config(None, [f"training.output_dir={tmp_path}"]), True, 1)
    assert (default.learning_rate, default.seed, default.max_grad_norm, default.logging_steps) == (1e-3, 0, 0.0, 50)
    assert trainer_default("adam_beta2") == default.adam_beta2 == 0.999
    # HfArgumentParser rewrites TrainingArguments' field types in place when it parses: a config read after a run
    # started still accepts a strategy by name
    assert load_config(None, ["training.eval_strategy=steps", "training.eval_steps=2"]).trainer_args[
        "eval_strategy"] == "steps"


def test_config_sections_check_their_types_and_choices_after_loading_too():
    experiment = load_config("ptb_gru_1x256")
    with pytest.raises(StrictDataclassFieldValidationError, match="step_gamma"):
        experiment.training.step_gamma = "fast"
    with pytest.raises(StrictDataclassFieldValidationError, match="scheduler"):
        experiment.training.scheduler = "linear"
    with pytest.raises(StrictDataclassFieldValidationError, match="max_length"):
        experiment.data.max_length = 1


def test_bf16_autocast_trains_on_cpu_for_the_gru(tmp_path):
    dtypes = []
    experiment = tiny_experiment(tmp_path, "training.bf16=true", "training.max_steps=2")
    from sfrnn_hf.training.train import SfrnnTrainer

    original = SfrnnTrainer.compute_loss

    def spy(self, model, inputs, *args, **kwargs):  # records the dtype the head computes in
        handle = model.lm_head.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
        try:
            return original(self, model, inputs, *args, **kwargs)
        finally:
            handle.remove()

    SfrnnTrainer.compute_loss = spy
    try:
        trainer, _ = run(experiment)
    finally:
        SfrnnTrainer.compute_loss = original
    assert dtypes and all(dtype == torch.bfloat16 for dtype in dtypes)  # autocast really was on
    assert all(math.isfinite(loss) for loss in logged_losses(trainer).values())
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())  # fp32 master weights


def test_bf16_lstm_trains_on_cpu(tmp_path):
    # torch 2.13's oneDNN has no bf16 LSTM on CPUs without native bf16: the recurrence must run in fp32 there
    # (recurrence_sfrnn.fused_recurrence), in training, evaluation and the bf16 pre-flight check alike.
    experiment = tiny_experiment(tmp_path, "training.bf16=true", "training.max_steps=2", "model.cell_type=lstm",
                                 "model.gradient_mode=bptt", validation=True)
    trainer, results = run(experiment)
    assert all(math.isfinite(loss) for loss in logged_losses(trainer).values())
    assert math.isfinite(results["validation_perplexity"])
