"""Hugging Face models of sfrnn: multi-layer GRU / LSTM / tanh-RNN language models trained with exact BPTT, DSF
(Diagonal State Feedbacks, arXiv 2503.23104) or FT-BPTT.

Layers: `SfrnnForCausalLM` (head + loss + generate; or `SfrnnForSequenceClassification`) -> `SfrnnModel` (embeddings, blocks, final norm) -> `SfrnnBlock`
(residual or pre-norm) -> `SfrnnRecurrentLayer` (cell weights, gradient mode; `recurrent_sfrnn.py`) -> cells and the
reverse diagonal scan (`cells_sfrnn.py`, `scan_sfrnn.py`). The recurrent state between calls lives in `SfrnnCache`.

Hub-exported file: imports only torch, transformers and its flat siblings.
"""

import hashlib
import math
import os

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel, TrainerCallback
from transformers import initialization as init
from transformers.cache_utils import Cache, LinearAttentionLayer
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast, SequenceClassifierOutput
from transformers.utils import logging

from .configuration_sfrnn import SfrnnConfig
from .lora_targets import register_with_peft
from .recurrence_sfrnn import effective_mask
from .recurrent_sfrnn import SfrnnRecurrentLayer, linspace_feedback


class SfrnnStateLayer(LinearAttentionLayer):
    """Cache of one layer: its whole recurrent state `(batch, S)` (the LSTM's `[h, c]` as one tensor)."""

    is_compileable = False  # generate would otherwise try to compile a Python time loop

    def lazy_initialization(self, conv_states=None, recurrent_states=None, state_idx=0, **kwargs):
        self.dtype, self.device = recurrent_states.dtype, recurrent_states.device
        self.is_recurrent_states_initialized[state_idx] = True

    def update_recurrent_state(self, recurrent_states, state_idx=0, **kwargs):
        if not self.is_recurrent_states_initialized[state_idx]:
            self.lazy_initialization(recurrent_states=recurrent_states, state_idx=state_idx)
        self.recurrent_states[state_idx] = recurrent_states
        self.has_previous_state[state_idx] = True  # else `get_recurrent_state` answers None: a silent restart at 0
        return recurrent_states

    def update_conv_state(self, conv_states, state_idx=0, **kwargs):
        raise NotImplementedError("sfrnn layers have no convolution state.")

    def batch_repeat_interleave(self, repeats: int):
        if self.is_recurrent_states_initialized[0]:
            self.recurrent_states[0] = self.recurrent_states[0].repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor):
        if self.is_recurrent_states_initialized[0]:
            self.recurrent_states[0] = self.recurrent_states[0][indices]


class SfrnnCache(Cache):
    """The recurrent state of every layer after the tokens seen so far: constant size, whatever the context length.

    `get_seq_length()` answers from a token counter the model advances (generate slices its inputs with it).
    """

    def __init__(self, config: SfrnnConfig):
        super().__init__(layers=[SfrnnStateLayer() for _ in range(config.num_hidden_layers)])
        self.seen_tokens = 0
        self.model_signature = _state_signature(config)  # which models' states it may hold

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def get_state(self, layer_idx: int) -> torch.Tensor | None:
        """The state `(batch, S)` of layer `layer_idx`, or None before the first token."""
        return self.get_recurrent_state(layer_idx)

    def set_state(self, layer_idx: int, state: torch.Tensor) -> None:
        self.update_recurrent_state(state, layer_idx)


class SfrnnMLP(nn.Module):
    """`Linear(d, 4d) -> GELU -> Linear(4d, d)` of the pre-norm block."""

    def __init__(self, config: SfrnnConfig):
        super().__init__()
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = nn.GELU()
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states):
        return self.down_proj(self.act(self.up_proj(hidden_states)))


class SfrnnBlock(GradientCheckpointingLayer):
    """`residual`: `x = x + RNN(x)` (the paper's PTB model). `prenorm`: `x = x + Linear(RNN(LN(x)))`, then
    `x = x + MLP(LN(x))` (the paper's WikiText-103 block). An LSTM exposing `[h, c]` always has the projection."""

    def __init__(self, config: SfrnnConfig, layer_idx: int):
        super().__init__()
        self.block_type = config.block_type
        self.layer_idx = layer_idx  # its own: PEFT may wrap `recurrent` in a module that lacks it
        self.recurrent = SfrnnRecurrentLayer(config, layer_idx)
        recurrent_width = self.recurrent.output_size
        prenorm = config.block_type == "prenorm"
        self.recurrent_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) if prenorm else None
        needs_projection = prenorm or recurrent_width != config.hidden_size
        self.output_projection = nn.Linear(recurrent_width, config.hidden_size) if needs_projection else None
        self.mlp_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) if prenorm else None
        self.mlp = SfrnnMLP(config) if prenorm else None
        for branch_output in (self.output_projection, self.mlp.down_proj if prenorm else None):
            if branch_output is not None:
                branch_output.is_residual_branch_output = True  # GPT-2 scaled init, see `_init_weights`

    def extra_repr(self) -> str:
        return f"layer_idx={self.layer_idx}, block_type={self.block_type}"

    def forward(self, hidden_states, initial_state=None, mask=None, need_final_state=False):
        """hidden_states `(batch, time, d)` -> `(batch, time, d)`, final state `(batch, S)`."""
        branch = hidden_states if self.recurrent_norm is None else self.recurrent_norm(hidden_states)
        branch, final_state = self.recurrent(branch, initial_state, mask, need_final_state)
        if self.output_projection is not None:
            branch = self.output_projection(branch)
        hidden_states = hidden_states + branch
        if self.mlp is not None:
            hidden_states = hidden_states + self.mlp(self.mlp_norm(hidden_states))
        return hidden_states, final_state


logger = logging.get_logger(__name__)
CODE_DIGESTS = "sfrnn_code_sha256"  # config.json: the SHA-256 of each code file saved beside the weights


def code_digests(folder: str) -> dict[str, str]:
    """`{file name: SHA-256}` of the flat code files in `folder`: `*_sfrnn.py` and `lora_targets.py` (PEFT's defaults),
    what `save_pretrained` copies beside the weights."""
    digests = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith("_sfrnn.py") or name == "lora_targets.py":
            with open(os.path.join(folder, name), "rb") as handle:
                digests[name] = hashlib.sha256(handle.read()).hexdigest()
    return digests


def check_folder_code(folder: str, config) -> list[str]:
    """Warn (and return the warnings) where the code files in a model `folder` differ from the code running now (the
    installed package's, or the folder's own when loaded as remote code) or from the digests recorded when the folder
    was saved: the same folder would then give other results with and without the package."""
    if not os.path.isdir(folder):
        return []
    in_folder = code_digests(folder)
    running = code_digests(os.path.dirname(os.path.abspath(__file__)))
    recorded = getattr(config, CODE_DIGESTS, None) or {}
    notes = []
    edited = sorted(name for name, digest in recorded.items() if name in in_folder and in_folder[name] != digest)
    if edited:
        notes.append(f"{folder}: {', '.join(edited)} changed after the model was saved (SHA-256 differs from the one "
                     "in config.json).")
    differ = sorted(name for name, digest in in_folder.items() if name in running and running[name] != digest)
    if differ:
        notes.append(f"{folder}: its {', '.join(differ)} differ from the code running now "
                     f"({os.path.dirname(os.path.abspath(__file__))}): this load runs the latter, and loading the "
                     "folder with trust_remote_code=True where sfrnn_hf is not imported runs the former.")
    for note in notes:
        logger.warning(note)
    return notes


class SfrnnPreTrainedModel(PreTrainedModel):
    config: SfrnnConfig
    config_class = SfrnnConfig
    base_model_prefix = "model"
    _no_split_modules = ["SfrnnBlock"]
    supports_gradient_checkpointing = True
    _is_stateful = True  # no assisted decoding: the state cannot be rolled back

    def get_input_embeddings(self):
        return self.base_model.embeddings

    def set_input_embeddings(self, new_embeddings):
        self.base_model.embeddings = new_embeddings

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Also writes the flat code files and the full `auto_map`, so that the folder loads with
        `trust_remote_code=True` where this package is not installed."""
        self.config.auto_map = dict(AUTO_MAP)
        setattr(self.config, CODE_DIGESTS, code_digests(os.path.dirname(os.path.abspath(__file__))))
        return super().save_pretrained(save_directory, *args, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`, then, for a local folder, `check_folder_code`; a feedback diagonal outside
        [0, 1] (or not finite) is refused, naming the layer."""
        model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        check_folder_code(str(pretrained_model_name_or_path), model.config)
        for name, module in model.named_modules():
            if isinstance(module, SfrnnRecurrentLayer):
                a = module.feedback
                if not bool(((a >= 0) & (a <= 1)).all()):  # NaN fails both
                    bad = a[~((a >= 0) & (a <= 1))][0].item()
                    raise ValueError(f"{pretrained_model_name_or_path}: `{name}.feedback` holds {bad}; a feedback "
                                     "diagonal must lie in [0, 1] (a contracting, finite decay). The checkpoint is "
                                     "damaged or was edited.")
        return model

    def update_calibrated_feedback(self) -> bool:
        """Move every calibrated feedback (`gradient_mode="dsf_calibrated"`) once, from the diag(J) statistics its layer
        recorded since the last call: call it once per optimizer step, after `optimizer.step()`, on every process.
        Returns whether any feedback moved."""
        moved = False
        for module in self.modules():
            if isinstance(module, SfrnnRecurrentLayer):
                moved = module.update_calibrated_feedback() or moved
        return moved

    def calibrated_feedback_callback(self) -> "CalibratedFeedbackCallback":
        """The Trainer callback that moves a calibrated feedback once per optimizer step: `Trainer(model, ...,
        callbacks=[model.calibrated_feedback_callback()])` (with remote code too; `sfrnn-train` adds it itself)."""
        return CalibratedFeedbackCallback()

    @torch.no_grad()
    def _init_weights(self, module):
        """Every parameter and buffer (v5 builds on the meta device and fills what a checkpoint lacks from here)."""
        std = self.config.initializer_range
        if isinstance(module, SfrnnRecurrentLayer):
            for name in module.cell.parameter_shapes(module.hidden_size):
                init.uniform_(getattr(module, name), *module.cell.init_range(name, module.hidden_size))
            init.copy_(module.feedback, linspace_feedback(self.config))
        elif isinstance(module, nn.Linear):
            if getattr(module, "is_residual_branch_output", False):
                std = std / math.sqrt(2 * self.config.num_hidden_layers)  # GPT-2 residual scaling
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)


def _check_inputs(config, input_ids, inputs_embeds, attention_mask, continues_cache=False):
    """Clear errors for bad inputs, before they reach torch. Returns `(batch, time)`.

    Token ids are read back to check their range (one host sync on an accelerator) except where they cannot be or
    need not be: under `torch.compile` (a data-dependent check cannot be traced) and in a one-token step continuing a
    cache (`continues_cache`: generate's decode steps, whose tokens the model itself chose). There an id out of range
    fails in the embedding instead.
    """
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("Pass exactly one of `input_ids` and `inputs_embeds` (got both or neither).")
    if input_ids is not None:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
            raise ValueError(f"`input_ids` must be an integer tensor, got {getattr(input_ids, 'dtype', type(input_ids))}.")
        if input_ids.dim() != 2:
            raise ValueError(f"`input_ids` must have shape (batch, time), got shape {tuple(input_ids.shape)}.")
        batch, time = input_ids.shape
    else:
        if not isinstance(inputs_embeds, torch.Tensor) or not inputs_embeds.dtype.is_floating_point:
            raise ValueError("`inputs_embeds` must be a floating-point tensor.")
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != config.hidden_size:
            raise ValueError(
                f"`inputs_embeds` must have shape (batch, time, {config.hidden_size}), got {tuple(inputs_embeds.shape)}."
            )
        batch, time = inputs_embeds.shape[:2]
    if time == 0 or batch == 0:
        raise ValueError(f"Empty input: got batch {batch} and sequence length {time}; both must be at least 1.")
    decode_step = continues_cache and time == 1
    if input_ids is not None and not decode_step and not torch.compiler.is_compiling():
        low, high = torch.stack(torch.aminmax(input_ids)).tolist()  # one transfer
        if low < 0 or high >= config.vocab_size:
            bad = low if low < 0 else high
            raise ValueError(f"`input_ids` holds id {bad}, outside the vocabulary [0, {config.vocab_size - 1}].")
    if attention_mask is not None:
        if attention_mask.dim() != 2 or attention_mask.shape[0] != batch or attention_mask.shape[1] < time:
            raise ValueError(
                f"`attention_mask` must have shape (batch={batch}, time>={time}), got {tuple(attention_mask.shape)}."
            )
    return batch, time


class PackedSequences:
    """Several sequences packed end to end in each row (transformers' `DataCollatorWithFlattening`), told apart by
    `position_ids` that restart at 0: the recurrence must restart at each sequence start, in every gradient mode.

    The recurrence runs on the sequences unpacked, one a row and right-padded (so every path of the layers applies
    unchanged, the DSF scan included: no credit crosses a boundary), and the outputs are packed back. A row's first
    sequence continues the row's initial state (a cache) unless its first position is 0; every later one starts at 0.

    position_ids `(batch, time)`, mask `(batch, time)` or None (0 at padding, which keeps its place in its sequence).
    """

    def __init__(self, position_ids: torch.Tensor, mask: torch.Tensor | None):
        batch, time = position_ids.shape
        real = torch.ones_like(position_ids, dtype=torch.bool) if mask is None else mask.bool()
        starts = (position_ids == 0) & real  # padding stays in the sequence it follows, holding its state
        starts[:, 0] = True  # each row's first position opens its first sequence
        self.resets_first = position_ids[:, 0] == 0  # (batch,)
        in_row = starts.long().cumsum(dim=1) - 1  # which sequence of its row each position belongs to
        per_row = in_row[:, -1] + 1
        first_of_row = per_row.cumsum(0) - per_row
        self.sequence = first_of_row[:, None] + in_row  # (batch, time): index of its sequence among all
        steps = torch.arange(time, device=position_ids.device).expand(batch, time)
        opened_at = torch.where(starts, steps, torch.zeros_like(steps)).cummax(dim=1).values
        self.step = steps - opened_at  # (batch, time): its step inside its sequence
        self.count, self.length = int(per_row.sum()), int(self.step.max()) + 1
        self.first_of_row, self.last_of_row = first_of_row, first_of_row + per_row - 1
        self.mask = self.unpack(real.to(position_ids.dtype))  # (count, length): 1 at real tokens

    @staticmethod
    def needed(position_ids: torch.Tensor | None, mask: torch.Tensor | None) -> bool:
        """Whether some row restarts at 0 after a real token (a host sync, skipped for one-token inputs)."""
        if position_ids is None or position_ids.shape[1] == 1:
            return False
        if torch.compiler.is_compiling():
            raise NotImplementedError("Packed sequences (`position_ids`, `cu_seq_lens_q`) are found by reading the "
                                      "positions, which torch.compile cannot trace: run them eagerly.")
        real = torch.ones_like(position_ids, dtype=torch.bool) if mask is None else mask.bool()
        seen_before = (real.long().cumsum(dim=1) - real.long()) > 0
        return bool(((position_ids == 0) & real & seen_before).any())

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """`(batch, time, ...)` -> `(count, length, ...)`, zeros past each sequence's end."""
        unpacked = packed.new_zeros(self.count, self.length, *packed.shape[2:])
        unpacked[self.sequence, self.step] = packed
        return unpacked

    def pack(self, unpacked: torch.Tensor) -> torch.Tensor:
        """`(count, length, ...)` -> `(batch, time, ...)`."""
        return unpacked[self.sequence, self.step]

    def initial_states(self, row_states: torch.Tensor | None, width: int, like: torch.Tensor) -> torch.Tensor | None:
        """Each sequence's initial state `(count, S)` from the rows' `(batch, S)` (None: zeros everywhere)."""
        if row_states is None:
            return None
        states = like.new_zeros(self.count, width)
        keep = ~self.resets_first[:, None]
        states[self.first_of_row] = torch.where(keep, row_states.to(states.dtype), torch.zeros_like(row_states))
        return states

    def final_states(self, sequence_states: torch.Tensor) -> torch.Tensor:
        """Each row's final state `(batch, S)`: its last sequence's."""
        return sequence_states[self.last_of_row]


class _FlushTinyValues(torch.autograd.Function):
    """Forward: values below `threshold` in magnitude -> 0. Backward: the gradient unchanged (straight through)."""

    @staticmethod
    def forward(ctx, inputs, threshold):
        return inputs.masked_fill(inputs.abs() < threshold, 0.0)

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output, None


def flush_tiny_values(inputs: torch.Tensor) -> torch.Tensor:
    """`inputs` (any shape) with its values below `sqrt(finfo.tiny)` in magnitude (1.1e-19 in float32) set to 0, on
    CPU; the gradient passes through unchanged. Why: embedding rows that the loss never reaches (`<pad>`, and `<eos>`
    when nothing follows it) only feel weight decay, and Adam leaves them at 1e-42 to 7e-38 (the protocol run, step
    6400). x86 CPUs run a matmul about 100x slower when its operands or its products are subnormal (below `tiny`,
    1.2e-38): the recurrence's input projection of a random PTB batch (56% padding) took 2024 ms instead of 21 ms, an
    epoch 4x longer (docs/results.md). Zeroing only the subnormal inputs is not enough (794 ms): tiny normal ones times
    a weight still underflow. Below `sqrt(tiny)`, no product with a weight above it does. Such a value times a weight
    below 1 is under half an ulp of any term of 1e-11 or more, so no such sum changes. GPUs run subnormals at full
    speed: left alone there."""
    if inputs.device.type != "cpu" or not inputs.dtype.is_floating_point:
        return inputs
    return _FlushTinyValues.apply(inputs, torch.finfo(inputs.dtype).tiny ** 0.5)


class SfrnnModel(SfrnnPreTrainedModel):
    """Embeddings -> blocks -> final LayerNorm (pre-norm models only)."""

    _keys_to_ignore_on_load_unexpected = [r"^lm_head\."]  # loading the base of a causal-LM checkpoint

    def __init__(self, config: SfrnnConfig):
        super().__init__(config)
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([SfrnnBlock(config, idx) for idx in range(config.num_hidden_layers)])
        self.norm_f = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) if config.block_type == "prenorm" else None
        self.gradient_checkpointing = False
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | dict | None = None,
        inputs_embeds: torch.Tensor | None = None,
        past_key_values: SfrnnCache | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        position_ids: torch.LongTensor | None = None,
        cu_seq_lens_q: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple | BaseModelOutputWithPast:
        """
        Args:
            input_ids: `(batch, time)` token ids, or `inputs_embeds` `(batch, time, d)`.
            attention_mask: `(batch, time')` with `time' >= time` (its last `time` columns are used), 1 for real
                tokens; at a 0 the recurrent state is held. generate's dict form `{"linear_attention": mask}` works too.
            past_key_values: an `SfrnnCache` to continue from (and to update); created when `use_cache`.
            position_ids: `(batch, time)`; only their restarts at 0 matter: several sequences packed in a row
                (`DataCollatorWithFlattening`) each start from a zero state (`PackedSequences`). Or `cu_seq_lens_q`
                `(sequences + 1,)`, the cumulative lengths of the sequences flattened into one row.
        """
        if isinstance(attention_mask, dict):
            attention_mask = attention_mask.get("linear_attention")
        if past_key_values is not None and not isinstance(past_key_values, SfrnnCache):
            raise ValueError(f"`past_key_values` must be an SfrnnCache, got {type(past_key_values).__name__}.")
        continues_cache = past_key_values is not None and past_key_values.seen_tokens > 0
        batch, time = _check_inputs(self.config, input_ids, inputs_embeds, attention_mask, continues_cache)
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if use_cache and past_key_values is None:
            past_key_values = SfrnnCache(self.config)
        if past_key_values is not None:
            _check_cache(past_key_values, self.config, batch)

        hidden_states = flush_tiny_values(self.embeddings(input_ids) if inputs_embeds is None else inputs_embeds)
        mask = None if attention_mask is None else attention_mask[:, -time:].to(hidden_states.device)
        if position_ids is not None and cu_seq_lens_q is None:
            position_ids = position_ids[:, -time:].to(hidden_states.device)
        packed = None
        if cu_seq_lens_q is not None:  # DataCollatorWithFlattening's boundaries of one flattened row
            position_ids = _positions_from_boundaries(cu_seq_lens_q.to(hidden_states.device), batch, time)
        if position_ids is not None and PackedSequences.needed(position_ids, mask):
            packed = PackedSequences(position_ids, mask)
        all_hidden_states = (hidden_states,) if output_hidden_states else None
        if packed is not None:
            hidden_states, mask = packed.unpack(hidden_states), packed.mask
        else:
            mask = effective_mask(mask)

        for idx, block in enumerate(self.layers):
            initial_state = past_key_values.get_state(idx) if past_key_values is not None else None
            if packed is not None:
                initial_state = packed.initial_states(initial_state, block.recurrent.state_size, hidden_states)
            hidden_states, final_state = block(hidden_states, initial_state, mask, past_key_values is not None)
            if past_key_values is not None:
                past_key_values.set_state(idx, final_state if packed is None else packed.final_states(final_state))
            if output_hidden_states:
                all_hidden_states += (hidden_states if packed is None else packed.pack(hidden_states),)
        if packed is not None:
            hidden_states = packed.pack(hidden_states)
        if self.norm_f is not None:
            hidden_states = self.norm_f(hidden_states)
            if output_hidden_states:
                all_hidden_states = all_hidden_states[:-1] + (hidden_states,)
        if past_key_values is not None:
            past_key_values.seen_tokens += time

        if not return_dict:
            return tuple(v for v in (hidden_states, past_key_values, all_hidden_states) if v is not None)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states, past_key_values=past_key_values, hidden_states=all_hidden_states
        )


def _state_signature(config) -> dict:
    """What makes a recurrent state meaningful to a model: its cell, width and depth."""
    return {"cell_type": config.cell_type, "hidden_size": config.hidden_size,
            "num_hidden_layers": config.num_hidden_layers}


def _positions_from_boundaries(cu_seq_lens: torch.Tensor, batch: int, time: int) -> torch.Tensor:
    """`position_ids` `(1, time)` restarting at each boundary of `cu_seq_lens` (one flattened row)."""
    if batch != 1:
        raise ValueError(f"`cu_seq_lens_q` describes one flattened row, but the batch has {batch} rows.")
    if cu_seq_lens.dim() != 1 or cu_seq_lens.numel() < 2 or cu_seq_lens.is_floating_point():
        raise ValueError(f"`cu_seq_lens_q` must be a 1-D integer tensor of boundaries [0, ..., {time}], got "
                         f"{cu_seq_lens.tolist()}.")
    if int(cu_seq_lens[0]) != 0 or not bool((cu_seq_lens[1:] > cu_seq_lens[:-1]).all()):
        raise ValueError(f"`cu_seq_lens_q` must start at 0 and increase strictly, got {cu_seq_lens.tolist()}.")
    if int(cu_seq_lens[-1]) != time:
        raise ValueError(f"`cu_seq_lens_q` ends at {int(cu_seq_lens[-1])}, but the row has {time} positions.")
    steps = torch.arange(time, device=cu_seq_lens.device)
    opened_at = cu_seq_lens[:-1][torch.searchsorted(cu_seq_lens[:-1], steps, right=True) - 1]
    return (steps - opened_at).unsqueeze(0)


def _check_cache(cache, config, batch):
    """A cache from another model (cell, size, depth) or batch gets a clear error rather than a shape error in torch,
    or worse, a silently misread state (an LSTM's `[h, c]` of width 2d looks like a GRU state of width 2d)."""
    expected_signature = _state_signature(config)
    if cache.model_signature != expected_signature:
        differ = [f"{key} {cache.model_signature[key]!r} (model: {expected_signature[key]!r})"
                  for key in expected_signature if cache.model_signature[key] != expected_signature[key]]
        raise ValueError(f"The cache was made for another model: {', '.join(differ)}.")
    if len(cache.layers) != config.num_hidden_layers:
        raise ValueError(f"The cache has {len(cache.layers)} layers, the model {config.num_hidden_layers}.")
    expected = config.hidden_size * config.state_multiplier
    for idx in range(config.num_hidden_layers):
        state = cache.get_state(idx)
        if state is not None and tuple(state.shape) != (batch, expected):
            raise ValueError(f"The cache holds states of shape {tuple(state.shape)} in layer {idx}, but this model "
                             f"and batch need ({batch}, {expected}).")


class SfrnnForCausalLM(SfrnnPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embeddings.weight"}

    def __init__(self, config: SfrnnConfig):
        super().__init__(config)
        self.model = SfrnnModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def labelled_token_loss(self, hidden_states, labels, num_items_in_batch=None, ignore_index=-100,
                            shift_labels=None, **kwargs) -> torch.Tensor:
        """transformers' causal-LM loss (`ForCausalLMLoss`: next-token cross-entropy in at least fp32, mean over the labelled
        tokens or sum / `num_items_in_batch`) with the output layer applied only where a label counts.

        hidden_states `(batch, time, d)`, labels `(batch, time)` (or `shift_labels`, already aligned) -> scalar.
        """
        if shift_labels is None:
            shift_labels = nn.functional.pad(labels, (0, 1), value=ignore_index)[:, 1:]
        shift_labels = shift_labels.to(hidden_states.device)
        labelled = shift_labels != ignore_index  # (batch, time)
        logits = self.lm_head(hidden_states[labelled])  # (labelled tokens, vocab)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        total = nn.functional.cross_entropy(logits, shift_labels[labelled], reduction="sum")
        if num_items_in_batch is None:  # the mean; a batch without a labelled token has loss 0, not 0 / 0
            return total / labelled.sum().clamp(min=1)
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return total / num_items_in_batch

    def _prepare_position_ids_for_generation(self, inputs_tensor, model_kwargs):
        # The state needs no positions (padding is held by the mask): only `position_ids` a caller passes (packed
        # prompts) reach the forward, so generation never pays for the packing check.
        return None

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # The stock DynamicCache breaks on all-recurrent layers: the model creates its own SfrnnCache.
        return False

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | dict | None = None,
        inputs_embeds: torch.Tensor | None = None,
        past_key_values: SfrnnCache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        return_logits: bool = False,
        position_ids: torch.LongTensor | None = None,
        **kwargs,
    ) -> tuple | CausalLMOutputWithPast:
        """
        Args:
            labels: `(batch, time)`; shifted inside the loss; -100 is ignored.
            position_ids, `cu_seq_lens_q` (in kwargs): packed sequences, see `SfrnnModel.forward`.
            logits_to_keep: compute logits for the last `logits_to_keep` positions only (0: all).
            return_logits: in a training forward with labels, also compute and return the `(batch, time, vocab)`
                logits (see below).
            **kwargs: passed to the loss (the Trainer's `num_items_in_batch` for gradient accumulation).

        A training forward with labels (`model.train()`, `labels` given, `logits_to_keep=0`, `return_logits=False`)
        returns the loss and `logits=None`: the output layer runs only at the positions whose label is not ignored,
        so padding costs no `vocab`-wide matmul and no `(batch, time, vocab)` tensor is held. The loss and every
        gradient equal the full computation's. Evaluation and generation always return logits.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            past_key_values=past_key_values,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            position_ids=position_ids,
            cu_seq_lens_q=kwargs.pop("cu_seq_lens_q", None),
        )
        hidden_states = outputs.last_hidden_state
        loss = logits = None
        if labels is not None and labels.shape != hidden_states.shape[:2]:
            raise ValueError(f"`labels` must have shape {tuple(hidden_states.shape[:2])}, got {tuple(labels.shape)}.")
        # (Not under torch.compile: selecting the labelled positions gives a data-dependent shape.)
        labelled_only = (
            labels is not None and self.training and not return_logits
            and isinstance(logits_to_keep, int) and logits_to_keep == 0 and not torch.compiler.is_compiling()
        )
        if labelled_only:
            loss = self.labelled_token_loss(hidden_states, labels, **kwargs)
        else:
            keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
            logits = self.lm_head(hidden_states[:, keep, :])
            if labels is not None:
                loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        if not return_dict:
            output = tuple(v for v in (logits, outputs.past_key_values, outputs.hidden_states) if v is not None)
            return ((loss,) + output) if loss is not None else output
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, past_key_values=outputs.past_key_values, hidden_states=outputs.hidden_states
        )


def last_real_positions(attention_mask: torch.Tensor | None, batch: int, time: int, device) -> torch.Tensor:
    """Index `(batch,)` of each row's last real token: the last 1 of `attention_mask` `(batch, time')` (its last
    `time` columns), wherever the padding is (left, right or both); `time - 1` without a mask. A row without a real
    token gets a ValueError (not under torch.compile, where the mask's values cannot be read)."""
    if attention_mask is None:
        return torch.full((batch,), time - 1, dtype=torch.long, device=device)
    positions = torch.arange(time, device=device)
    last = torch.where(attention_mask[:, -time:].to(device).bool(), positions, -1).amax(dim=1)
    if not torch.compiler.is_compiling() and bool((last < 0).any()):
        rows = (last < 0).nonzero().flatten().tolist()
        raise ValueError(f"`attention_mask` rows {rows} hold no real token (all 0): nothing to classify.")
    return last


class SfrnnForSequenceClassification(SfrnnPreTrainedModel):
    """The recurrent model with a linear head `score` on the hidden state of each row's last real token (after the
    final norm of pre-norm models): the state that has read the whole sequence. Left and right padding both work
    through `attention_mask` (padding holds the recurrent state, and the head reads the last real position).

    Loss as every transformers classifier (`config.problem_type`, inferred when None from `num_labels` and the labels'
    dtype): `"regression"` (MSE), `"single_label_classification"` (cross-entropy), `"multi_label_classification"`
    (BCE with logits). Trains in every gradient mode; a causal-LM checkpoint loads into it (the head is new).
    """

    _keys_to_ignore_on_load_unexpected = [r"^lm_head\."]  # starting from a causal-LM checkpoint

    def __init__(self, config: SfrnnConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = SfrnnModel(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> tuple | SequenceClassifierOutput:
        """
        Args:
            input_ids: `(batch, time)`, or `inputs_embeds` `(batch, time, d)`.
            attention_mask: `(batch, time)`, 1 for real tokens; padding anywhere (the head reads the last real token).
            labels: `(batch,)` class ids, `(batch,)` / `(batch, num_labels)` floats for regression, or
                `(batch, num_labels)` 0/1 floats for multi-label classification.
            **kwargs: passed to the loss (the Trainer's `num_items_in_batch`).
        Returns:
            logits `(batch, num_labels)`, the loss when `labels` are given.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                             use_cache=False, output_hidden_states=output_hidden_states, return_dict=True)
        hidden_states = outputs.last_hidden_state  # (batch, time, d)
        batch, time = hidden_states.shape[:2]
        if isinstance(attention_mask, dict):
            attention_mask = attention_mask.get("linear_attention")
        last = last_real_positions(attention_mask, batch, time, hidden_states.device)
        logits = self.score(hidden_states[torch.arange(batch, device=hidden_states.device), last])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, pooled_logits=logits, config=self.config,
                                      **kwargs)
        if not return_dict:
            output = tuple(v for v in (logits, outputs.hidden_states) if v is not None)
            return ((loss,) + output) if loss is not None else output
        return SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states)


class CalibratedFeedbackCallback(TrainerCallback):
    """Moves a calibrated DSF feedback once per optimizer step, from all its micro-batches and processes
    (`SfrnnPreTrainedModel.update_calibrated_feedback`). `SfrnnTrainer` installs it; add it to a plain `Trainer`
    that trains a model with `gradient_mode="dsf_calibrated"` (a no-op where no statistics were recorded)."""

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PEFT model
        base.update_calibrated_feedback()


# `register_for_auto_class` makes save_pretrained copy the code; it writes only the saved class into `auto_map`,
# so the whole map is set in `save_pretrained`.
AUTO_MAP = {
    "AutoConfig": "configuration_sfrnn.SfrnnConfig",
    "AutoModel": "modeling_sfrnn.SfrnnModel",
    "AutoModelForCausalLM": "modeling_sfrnn.SfrnnForCausalLM",
    "AutoModelForSequenceClassification": "modeling_sfrnn.SfrnnForSequenceClassification",
}
SfrnnConfig.register_for_auto_class("AutoConfig")
SfrnnModel.register_for_auto_class("AutoModel")
SfrnnForCausalLM.register_for_auto_class("AutoModelForCausalLM")
SfrnnForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")
register_with_peft()  # PEFT's LoRA defaults for sfrnn, also where this file is a checkpoint's remote code

__all__ = ["SfrnnPreTrainedModel", "SfrnnModel", "SfrnnForCausalLM", "SfrnnForSequenceClassification", "SfrnnCache",
           "CalibratedFeedbackCallback"]
