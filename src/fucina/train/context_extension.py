"""`init_from` with model overrides, a larger `model.context_length` above all (context extension).

Design choices:
- Learned positions: the table grows by COPYING: the trained rows 0..L-1 are kept as they are and
  row i >= L starts as a copy of row i mod L. So the extended model computes exactly what the trained
  one did on inputs up to L tokens (nothing is lost before the fine-tune at the new length), and the new
  rows start from vectors the blocks already know how to read. `interpolate` (the trained rows
  resampled linearly over the new length, GPT-2-era practice) is available to callers of
  `extend_learned_positions`; it moves every trained position, so the model changes even on short inputs.
  A smaller context keeps the first rows.
- RoPE: the weights do not depend on the length, so a larger context is plain extrapolation unless
  `model.rope_scaling` is given (rope_scaling.py); its `original_context_length` defaults to the
  trained model's context and its `factor` to new / original.
- Everything else an override changes must keep every weight's shape: a change that cannot be carried
  over (d_model, heads, vocabulary, ...) is one ConfigError line naming the first weight that no longer
  fits, never a size-mismatch traceback.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import torch

from fucina.config import from_dict
from fucina.errors import ConfigError
from fucina.model.config import ModelConfig
from fucina.model.transformer import Transformer
from fucina.train.config import scientific_floats

log = logging.getLogger(__name__)

POSITION_TABLE = "position_embedding.weight"


def extend_learned_positions(
    table: torch.Tensor, length: int, method: Literal["copy", "interpolate"] = "copy"
) -> torch.Tensor:
    """A learned position table (L, d) resized to (length, d); see the module docstring for the methods."""
    old = table.size(0)
    if length <= old:
        return table[:length].clone()
    if method == "copy":
        return table[torch.arange(length) % old].clone()
    if method == "interpolate":
        resampled = torch.nn.functional.interpolate(
            table.float().T.unsqueeze(0), size=length, mode="linear", align_corners=True
        )  # (1, d, length)
        return resampled[0].T.to(table.dtype).contiguous()
    raise ConfigError(f"position extension method {method!r} is not one of copy, interpolate")


def _with_scaling_defaults(fields: dict[str, Any], trained: ModelConfig) -> dict[str, Any]:
    """Fill rope_scaling's original_context_length (the trained context) and factor (new / original)."""
    scaling = fields.get("rope_scaling")
    if not isinstance(scaling, dict):
        return fields
    scaling = dict(scaling)
    scaling.setdefault("original_context_length", trained.context_length)
    if "factor" not in scaling:
        original = scaling["original_context_length"]
        scaling["factor"] = max(1.0, fields.get("context_length", trained.context_length) / original)
    return {**fields, "rope_scaling": scaling}


def model_with_overrides(
    model: Transformer, overrides: dict[str, Any], positions: Literal["copy", "interpolate"] = "copy"
) -> Transformer:
    """The `init_from` model rebuilt with `model:` overrides, its weights carried over (see module doc)."""
    if not overrides:
        return model
    if "preset" in overrides:
        raise ConfigError("model.preset cannot be combined with init_from (the model comes from init_from)")
    trained = model.config
    fields = {**trained.to_dict(), **scientific_floats(dict(overrides), ModelConfig)}
    config = from_dict(ModelConfig, _with_scaling_defaults(fields, trained), "model")
    state = dict(model.state_dict())
    if config.context_length != trained.context_length:
        if POSITION_TABLE in state:
            state[POSITION_TABLE] = extend_learned_positions(
                state[POSITION_TABLE], config.context_length, positions
            )
        log.info(
            "context %d -> %d (%s)",
            trained.context_length,
            config.context_length,
            f"learned positions: {positions}"
            if trained.positions == "learned" and POSITION_TABLE in state
            else f"RoPE scaling {config.rope_scaling or 'none (extrapolation)'}",
        )
    rebuilt = Transformer(config)
    expected = rebuilt.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        name = (missing or unexpected)[0]
        raise ConfigError(
            f"model overrides {sorted(overrides)} change the architecture of the init_from model "
            f"({'no trained weight for' if missing else 'no place for the trained weight'} {name})"
        )
    for name, tensor in expected.items():
        if tensor.shape != state[name].shape:
            raise ConfigError(
                f"model overrides {sorted(overrides)} cannot be applied to the init_from model: {name} is "
                f"{tuple(state[name].shape)} there and would be {tuple(tensor.shape)}"
            )
    rebuilt.load_state_dict(state, strict=True)
    return rebuilt
