"""sfrnn_hf: recurrent language models for Hugging Face Transformers, trained with exact BPTT or with Diagonal State
Feedbacks (DSF, arXiv 2503.23104), a fixed diagonal replacement of the state Jacobian that makes the backward a
reverse diagonal scan plus parallel one-step gradients.

`import sfrnn_hf` registers the `sfrnn` model type with `AutoConfig`, `AutoModel`, `AutoModelForCausalLM` and
`AutoModelForSequenceClassification`; `modeling_sfrnn` registers its LoRA defaults with PEFT (`lora_targets.py`).
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

from .configuration_sfrnn import BLOCK_TYPES, CELL_TYPES, GRADIENT_MODES, SfrnnConfig
from .modeling_sfrnn import (
    SfrnnCache,
    SfrnnForCausalLM,
    SfrnnForSequenceClassification,
    SfrnnModel,
    SfrnnPreTrainedModel,
)
from .scan_sfrnn import reverse_diagonal_scan

AutoConfig.register(SfrnnConfig.model_type, SfrnnConfig, exist_ok=True)
AutoModel.register(SfrnnConfig, SfrnnModel, exist_ok=True)
AutoModelForCausalLM.register(SfrnnConfig, SfrnnForCausalLM, exist_ok=True)
AutoModelForSequenceClassification.register(SfrnnConfig, SfrnnForSequenceClassification, exist_ok=True)

__version__ = "0.1.0"
__all__ = [
    "SfrnnConfig",
    "SfrnnModel",
    "SfrnnForCausalLM",
    "SfrnnForSequenceClassification",
    "SfrnnPreTrainedModel",
    "SfrnnCache",
    "reverse_diagonal_scan",
    "CELL_TYPES",
    "GRADIENT_MODES",
    "BLOCK_TYPES",
]
