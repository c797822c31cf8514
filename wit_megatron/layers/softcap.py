"""tanh soft-capping (Gemma-2): values pass as cap·tanh(x / cap), so they stay within (-cap, cap).

`final_logit_softcap` is the one function every path from hidden states to the loss applies to the
output logits: `ExtendedGPTModel`'s output layer, and any code that computes logits itself (a chunked
loss) must call it too, or its NLL is that of a different model.
"""

from __future__ import annotations

from typing import Optional

import torch


def softcap(x: torch.Tensor, cap: float) -> torch.Tensor:
    """cap·tanh(x / cap), computed in float32 and returned in x's dtype."""
    return (torch.tanh(x.float() / cap) * cap).to(x.dtype)


def final_logit_softcap(logits: torch.Tensor, cap: Optional[float]) -> torch.Tensor:
    """The model's output logits (any shape, any vocabulary shard: the cap acts element-wise) after its
    final-logit soft-capping; unchanged when the model has none (cap None)."""
    return logits if cap is None else softcap(logits, cap)
