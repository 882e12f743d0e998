"""LoRA targets of sfrnn models, and what PEFT is told about them.

The recurrent matrices `weight_ih` / `weight_hh` are raw parameters of each `SfrnnRecurrentLayer` (the layout of
`torch.nn.GRU`), read inside its forward: PEFT adapts them through `LoraConfig(target_parameters=...)`, so the fused
forward, generation and the DSF gradient all use the adapted weights. Ordinary modules (`output_projection`,
`up_proj`, `down_proj`, `lm_head`, `embeddings`) take `target_modules`.

PEFT gives a `LoraConfig` without targets the defaults of its model type from a table of module names
(`TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING`, where RWKV's are). That table cannot name parameters, so
`register_with_peft` enters sfrnn there (no default module) and wraps the one LoRA step that reads it
(`LoraModel._prepare_adapter_config`) so that, for an sfrnn model:

- no targets: the recurrent matrices of every layer (`target_parameters=["recurrent.weight_ih",
  "recurrent.weight_hh"]`; only `weight_ih` where the cell has no recurrent matrix: minGRU's is empty, IndRNN's a
  vector);
- `target_modules="all-linear"`: PEFT's linear modules (all but the head) and the recurrent matrices, which are the
  cell's own linear maps (a residual GRU model has no other);
- a target that names no LoRA-able part of the model: a ValueError saying what to use.
"""

import functools

# The recurrent layer's LoRA-able parameters: 2-D matrices read inside `SfrnnRecurrentLayer.forward`
# (PEFT's `target_parameters` cannot adapt the 1-D biases).
RECURRENT_LORA_PARAMETERS = ("weight_ih", "weight_hh")
LINEAR_LORA_MODULES = ("output_projection", "up_proj", "down_proj", "lm_head")
# Every module of an sfrnn model PEFT can wrap (nn.Linear and nn.Embedding).
LORA_MODULES = LINEAR_LORA_MODULES + ("embeddings",)
MODEL_TYPE = "sfrnn"


def recurrent_lora_parameters(cell_type: str) -> tuple[str, ...]:
    """The recurrent parameters a LoRA can adapt in a model of `cell_type`: those of `RECURRENT_LORA_PARAMETERS` that
    the cell makes non-empty matrices (the emptiness of a shape does not depend on the width)."""
    from .cells_sfrnn import get_cell

    shapes = get_cell(cell_type).parameter_shapes(1)
    return tuple(name for name in RECURRENT_LORA_PARAMETERS if len(shapes[name]) == 2 and 0 not in shapes[name])


def default_target_parameters(cell_type: str) -> list[str]:
    """What `LoraConfig` without targets adapts in every layer of a `cell_type` model (PEFT's `target_parameters`)."""
    return [f"recurrent.{name}" for name in recurrent_lora_parameters(cell_type)]


def check_lora_targets(target_modules, target_parameters, cell_type: str) -> None:
    """ValueError naming a target that is no LoRA-able part of an sfrnn model of `cell_type`, and what to use instead.
    Names are matched by their last dotted part, as PEFT matches them; a regex string (`target_modules="..."`) is
    PEFT's to match and is not checked."""
    lora_parameters = recurrent_lora_parameters(cell_type)
    for name in sorted(target_parameters or ()):
        if name.split(".")[-1] not in lora_parameters:
            raise ValueError(
                f"target_parameters: {name!r} is not a LoRA-able recurrent parameter of an {cell_type} model; choose "
                f"among {list(lora_parameters)} (a 1-D bias or vector, or an empty matrix, cannot carry a low-rank "
                "update).")
    if isinstance(target_modules, str):
        return
    for name in sorted(target_modules or ()):  # (PEFT holds them in a set)
        last = name.split(".")[-1]
        if last in LORA_MODULES:
            continue
        if last in ("recurrent", "weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            raise ValueError(
                f"target_modules: {name!r} is not a module LoRA can wrap: an sfrnn model's recurrent weights are "
                f"parameters of its `recurrent` layers. Use target_parameters={default_target_parameters(cell_type)} "
                f"(what LoraConfig without targets adapts); modules, if any: {list(LORA_MODULES)}.")
        raise ValueError(
            f"target_modules: {name!r} names no module LoRA can wrap in an sfrnn model; choose among "
            f"{list(LORA_MODULES)} (output_projection: prenorm blocks or an LSTM exposing [h, c]; up_proj, down_proj: "
            f"prenorm blocks), and target_parameters={default_target_parameters(cell_type)} for the recurrence itself.")


def sfrnn_lora_defaults(peft_config, model_config: dict) -> None:
    """Fill (in place) what the `LoraConfig` of a model of `model_config` (the dict PEFT passes) leaves to defaults,
    then check its targets."""
    from peft.utils.constants import INCLUDE_LINEAR_LAYERS_SHORTHAND

    cell_type = model_config["cell_type"]
    if not peft_config.target_parameters and (peft_config.target_modules is None
                                              or peft_config.target_modules == INCLUDE_LINEAR_LAYERS_SHORTHAND):
        if peft_config.target_modules is None:
            peft_config.target_modules = set()  # PEFT's way of saying "no module, parameters only"
        peft_config.target_parameters = default_target_parameters(cell_type)
    check_lora_targets(peft_config.target_modules, peft_config.target_parameters, cell_type)


def register_with_peft() -> bool:
    """Make sfrnn's LoRA defaults known to PEFT (see the module docstring). Idempotent; False when PEFT is not
    installed or does not have the step this relies on (then targets must be given explicitly)."""
    try:
        from peft.tuners.lora.model import LoraModel
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    except ImportError:
        return False
    prepare = getattr(LoraModel, "_prepare_adapter_config", None)
    if prepare is None:
        return False
    TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.setdefault(MODEL_TYPE, [])
    if getattr(prepare, "sfrnn_defaults", False):
        return True

    @functools.wraps(prepare)
    def prepare_adapter_config(self, peft_config, model_config):
        if model_config.get("model_type") == MODEL_TYPE:
            sfrnn_lora_defaults(peft_config, model_config)
        return prepare(self, peft_config, model_config)

    prepare_adapter_config.sfrnn_defaults = True
    LoraModel._prepare_adapter_config = prepare_adapter_config
    return True


__all__ = ["recurrent_lora_parameters", "default_target_parameters", "RECURRENT_LORA_PARAMETERS", "LINEAR_LORA_MODULES",
           "LORA_MODULES", "check_lora_targets", "register_with_peft"]
