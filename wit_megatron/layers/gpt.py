"""ExtendedGPTModel: megatron-core's GPTModel plus what `ExtendedTransformerConfig` asks of the model as a
whole (the layers' part is in their spec):

- `embedding_multiplier`: the word embeddings times the multiplier rounded to their dtype (transformers'
  Gemma: `embed * tensor(√hidden).to(dtype)`), before the first layer; the tied output matrix is not scaled;
- `final_logit_softcapping`: the output layer's logits are soft-capped (`softcap.final_logit_softcap`), so
  both the logits GPTModel returns and the vocab-parallel cross entropy it computes with labels see them;
- `rotary_base_local`: the RoPE module answers with [global, local] (`attention.LocalGlobalRotaryEmbedding`).

Both element-wise changes are forward hooks on GPTModel's own submodules, so parameter names, checkpoint
keys, tying and every megatron-core version's forward stay GPTModel's.
"""

from __future__ import annotations

import torch
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.models.gpt import GPTModel

from wit_megatron.layers.attention import LocalGlobalRotaryEmbedding
from wit_megatron.layers.softcap import final_logit_softcap


class ExtendedGPTModel(GPTModel):
    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        multiplier = getattr(config, "embedding_multiplier", None)
        if self.pre_process and multiplier is not None:
            self.embedding.register_forward_hook(
                lambda module, inputs, output: output * torch.tensor(multiplier, dtype=output.dtype, device=output.device))
        cap = getattr(config, "final_logit_softcapping", None)
        if self.post_process and cap is not None:
            self.output_layer.register_forward_hook(
                lambda module, inputs, output: (final_logit_softcap(output[0], cap), *output[1:]))
        local_base = getattr(config, "rotary_base_local", None)
        if local_base is not None:
            local = RotaryEmbedding(kv_channels=config.kv_channels, rotary_percent=1.0, rotary_interleaved=config.rotary_interleaved,
                                    rotary_base=local_base, use_cpu_initialization=config.use_cpu_initialization,
                                    cp_group=self.pg_collection.cp)
            self.rotary_pos_emb = LocalGlobalRotaryEmbedding(self.rotary_pos_emb, local)
