"""The tools around sfrnn models, none of which a Hub checkpoint needs: training from a YAML config (`sfrnn-train`),
data and tokenizers, run folders and checkpoints that survive a kill, the demo, Hub export (`sfrnn-export`) and
gradient-fidelity measurement. The model itself, the flat files a Hub folder carries, is the parent package.

- `config.py`: the sections of `sfrnn-train`'s YAML config (strict dataclasses; `training` takes `TrainingArguments`
  fields by their own names) and every check made before training; `config_reading.py`: YAML values and overrides
  typed and checked against a field
- `train.py`: `sfrnn-train`, the Trainer with the paper's optimiser and schedules, perplexity, LoRA
- `data.py`: PTB, WikiText and local text, the tokenizers, the padding collator
- `run_folder.py`, `checkpoints.py`: a run owns its folder (and what a resume may change); checkpoints sealed by a
  manifest
- `demo.py`: `make demo`
- `export.py`: `sfrnn-export`, a complete Hub repository folder with a model card
- `fidelity.py`: how close the DSF / FT-BPTT gradients are to BPTT's
"""
