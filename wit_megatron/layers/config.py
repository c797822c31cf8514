"""ExtendedTransformerConfig: megatron-core's TransformerConfig plus the fields its GPTModel has no
counterpart for. The modules of `wit_megatron.layers` read them from the config every module receives.

Fields megatron-core already has are used as they are: `softmax_scale` (Gemma's 1/√query_pre_attn_scalar),
`window_size` with `window_attn_skip_freq` (a per-layer list, 1 = sliding window), `layernorm_zero_centered_gamma`
(norms scale by 1 + w), `activation_func` with `gated_linear_unit` (GeGLU).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron.core.transformer import TransformerConfig


@dataclass
class ExtendedTransformerConfig(TransformerConfig):
    attn_logit_softcapping: Optional[float] = None
    """Attention scores become cap·tanh(score / cap) after scaling, before the mask and softmax (Gemma-2)."""

    final_logit_softcapping: Optional[float] = None
    """Output logits become cap·tanh(logit / cap), also those the training loss is computed from (Gemma-2)."""

    embedding_multiplier: Optional[float] = None
    """Word embeddings are multiplied by this value rounded to their dtype, as transformers does (Gemma: √hidden)."""

    rotary_base_local: Optional[float] = None
    """RoPE base of the sliding-window layers when it is not `rotary_base` (Gemma-3: 10000, global 1e6)."""

    def __post_init__(self):
        super().__post_init__()
        for name in ("attn_logit_softcapping", "final_logit_softcapping", "embedding_multiplier", "rotary_base_local"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be positive or None, got {value!r}")
        if self.rotary_base_local is not None and not self.window_size:
            raise ValueError("rotary_base_local is the RoPE base of sliding-window layers: set window_size too")
