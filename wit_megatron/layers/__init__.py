"""What megatron-core's GPTModel lacks for some model families (Gemma-2, Gemma-3), as config fields and
layer-spec modules of this project; `wit_megatron.model` puts them in when an architecture needs them.

    config.py     ExtendedTransformerConfig: TransformerConfig plus soft-capping, embedding multiplier, local RoPE base
    softcap.py    tanh soft-capping; `final_logit_softcap`, the one function every path to the loss applies
    norm.py       RMSNorm in float32 with a (1 + w) weight (local spec); linear layers followed by a norm
    attention.py  core attention with a softmax scale, score soft-capping and per-layer sliding windows;
                  self-attention taking the local RoPE on its sliding-window layers
    gpt.py        ExtendedGPTModel: embedding multiplier, final-logit soft-capping, local + global RoPE
"""
