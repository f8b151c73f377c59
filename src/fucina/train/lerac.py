"""LeRaC: learning-rate curriculum across depth (Croitoru et al., arXiv 2205.09180).

What the paper does: every layer starts at its own learning rate, lower the deeper the layer is
(the input layer at the common rate eta, layer j at eta * c^-j, never below a floor), and each rate grows
geometrically (exponentially in the step) to the common rate eta by iteration k; from then on all layers
follow the ordinary schedule. The idea is that early on, deep layers are fed the noisy features of
untrained shallow layers, so they should move slowly until those settle.

What is built here, and the choices the paper leaves open:
- Depth: the embeddings (token and learned positions) are depth 0, block i is depth i + 1, the final norm
  and the LM head are depth n_layers + 1 (the output layer is the deepest, as in the paper's networks).
  A head tied to the token embedding is one parameter and takes the embedding's rate (depth 0): one
  tensor cannot have two rates.
- Group j's starting factor is max(c^-j, min_lr / lr); at step t its factor is start^(1 - t/steps), which
  is 1 from `steps` on. The factor MULTIPLIES the ordinary schedule's rate at that step (so the rate stays
  a pure function of the optimizer step and composes with warmup, WSD and resume); with no warmup this is
  exactly the paper's curriculum. Elleci's "LeRaC" is a static per-layer multiplier that grows with depth,
  the opposite of the paper, and never converges to the common rate: not what this does.
"""

from __future__ import annotations

import re

from torch import nn

from fucina.train.config import LeRaCSection

_BLOCK = re.compile(r"^blocks\.(\d+)\.")
EMBEDDING_PREFIXES = ("token_embedding.", "position_embedding.")


def parameter_depth(name: str, n_layers: int) -> int:
    """Depth of a parameter by the rule in the module docstring."""
    match = _BLOCK.match(name)
    if match:
        return int(match.group(1)) + 1
    if name.startswith(EMBEDDING_PREFIXES):
        return 0
    return n_layers + 1


def model_depth(model: nn.Module) -> int:
    """The number of blocks, from the model's config (or its `blocks` list)."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "n_layers"):
        return int(config.n_layers)
    return len(getattr(model, "blocks", []))


def lerac_factor(section: LeRaCSection, peak_lr: float, depth: int, step: int) -> float:
    """The multiplier of the schedule's rate for a group at `depth` at optimizer step `step`."""
    if not section.enabled or step >= section.steps or depth == 0:
        return 1.0
    start = max(section.c ** (-depth), section.min_lr / peak_lr)
    return start ** (1.0 - step / section.steps)
