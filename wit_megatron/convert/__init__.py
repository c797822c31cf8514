"""Hugging Face <-> Megatron-Core checkpoint conversion: exact, streamed, any parallel layout.

`convert_hf_to_megatron` and `convert_megatron_to_hf` are the entry points; `families/` holds one
declarative name table per model family, `transforms.py` the few tensor transforms.
"""

from wit_megatron.convert.transforms import ConversionError

__all__ = ["ConversionError"]
