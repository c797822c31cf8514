"""Norms the local (torch) layer spec lacks, and linear layers whose output is normalised (post-norms).

megatron-core's local spec builds torch's RMSNorm, which refuses `layernorm_zero_centered_gamma`
(Gemma's weights are stored around 0 and scale by 1 + w); Transformer Engine's norms honour it. A
norm after attention and after the MLP (Gemma-2/3) has no slot in TransformerLayer: it goes into the
output projections (`linear_proj`, `linear_fc2`), applied to their output before the residual add,
under the checkpoint key `<linear>.post_layernorm.weight` (Megatron-Bridge's name for the same norm).
"""

from __future__ import annotations

from functools import lru_cache

import torch


class RMSNorm(torch.nn.Module):
    """RMSNorm computed in float32 and cast back, as transformers' Gemma and Llama norms compute it:
    x·rsqrt(mean(x²) + ε)·w, or ·(1 + w) when `config.layernorm_zero_centered_gamma` (weights start at 0)."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **kwargs):
        super().__init__()
        self.eps = eps
        self.zero_centered = config.layernorm_zero_centered_gamma
        init = torch.zeros if self.zero_centered else torch.ones
        self.weight = torch.nn.Parameter(init(hidden_size, dtype=config.params_dtype))
        # Under sequence parallelism each rank sees part of the sequence: megatron-core all-reduces the
        # gradients of parameters marked like this one.
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        weight = self.weight.float()
        return (y * (1.0 + weight if self.zero_centered else weight)).to(x.dtype)


@lru_cache(maxsize=None)
def with_post_norm(linear: type, norm: type) -> type:
    """A subclass of the row-parallel `linear` (local or Transformer Engine) that applies `norm` to its
    output. Its bias must be off (every family with post-norms has none): the norm would come before it."""

    class PostNormLinear(linear):
        def __init__(self, input_size: int, output_size: int, *, config, **kwargs):
            super().__init__(input_size, output_size, config=config, **kwargs)
            self.post_layernorm = norm(config=config, hidden_size=output_size, eps=config.layernorm_epsilon)

        def forward(self, x, *args, **kwargs):
            output, bias = super().forward(x, *args, **kwargs)
            if bias is not None:
                raise ValueError(f"{type(self).__name__}: a post-norm linear layer must have no bias")
            return self.post_layernorm(output), bias

    PostNormLinear.__name__ = PostNormLinear.__qualname__ = f"{linear.__name__}WithPostNorm"
    return PostNormLinear
