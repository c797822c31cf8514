"""Megatron-Bridge's AutoBridge as the peer converter in bench/bench_convert.py (CPU, one process).

    python bench/peer_megatron_bridge.py check
    python bench/peer_megatron_bridge.py import --hf HF_DIR --out CKPT
    python bench/peer_megatron_bridge.py export --hf HF_DIR --megatron CKPT --out HF_DIR

Megatron-Bridge is not a dependency of this project. What running it on a CPU machine takes
(docs/convert.md, "Peer converter"): megatron-bridge installed with --no-deps next to megatron-core
0.19 and the few packages its imports need; a transformers within its pin (5.8 to 5.12.1: 5.24 lacks
`transformers.modeling_attn_mask_utils`), given on PYTHONPATH so the environment's own stays; a
stand-in `transformer_engine` while `megatron.bridge` imports (its LoRA module imports it
unconditionally; megatron-core's specs are imported first so they still see no TE); the local layer
spec; and this project's CPU layer (wit_megatron.runtime.cpu) for megatron-core's CUDA calls.
"""

from __future__ import annotations

import argparse
import importlib.machinery
import sys
import types

INSTALL = ("pip install --target PEER_OVERLAY --no-deps megatron-bridge==0.6.2 nvidia-modelopt 'pulp<4' einops omegaconf "
           "ninja nvidia-ml-py scipy megatron-energon transformers==5.12.1 tokenizers==0.22.2 httpx 'httpcore==1.*' "
           "'huggingface-hub>=1.5,<2' kernels==0.13.0 multi-storage-client braceexpand filetype mfusepy rapidyaml "
           "webdataset xattr cffi pycparser lark wcmatch bracex opentelemetry-api deprecation  "
           "(Python >= 3.12, megatron-core 0.19; run with PYTHONPATH=PEER_OVERLAY; docs/convert.md, 'Peer converter')")
# Imported before the stand-in exists, so that they decide "no Transformer Engine" for good.
IMPORT_WITHOUT_TE = ("megatron.core", "megatron.core.models.gpt.gpt_layer_specs",
                     "megatron.core.models.hybrid.hybrid_layer_specs", "modelopt.torch")
TE_MODULES = ("transformer_engine", "transformer_engine.pytorch", "transformer_engine.common")


def import_auto_bridge():
    """megatron.bridge.AutoBridge, imported behind a transformer_engine stand-in that is removed afterwards."""
    import importlib
    import importlib.util

    if importlib.util.find_spec("megatron.bridge") is None:
        raise ImportError("no module megatron.bridge")
    for name in IMPORT_WITHOUT_TE:
        importlib.import_module(name)
    stand_ins = {}
    for name in TE_MODULES:
        module = types.ModuleType(name)
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
        module.__path__ = []
        stand_ins[name] = module
    stand_ins["transformer_engine.pytorch"].ops = types.SimpleNamespace(Sequential=object)  # a type annotation
    sys.modules.update(stand_ins)
    try:
        from megatron.bridge import AutoBridge
    finally:
        for name in TE_MODULES:
            sys.modules.pop(name, None)
    return AutoBridge


def cpu_setup() -> None:
    """One gloo rank with Megatron's tp1pp1 groups and the CPU layer (as this project's converter)."""
    from wit_megatron.runtime.parallel import init_single_process

    init_single_process()


def import_hf(auto_bridge, hf: str, out: str) -> None:
    """AutoBridge.import_ckpt's steps, with the local layer spec and CPU initialization."""
    from megatron.bridge.models.gpt_provider import local_layer_spec

    bridge = auto_bridge.from_hf_pretrained(hf)
    provider = bridge.to_megatron_provider(load_weights=True)
    provider.transformer_layer_spec = local_layer_spec
    provider.apply_rope_fusion = False
    provider.gradient_accumulation_fusion = False
    provider.masked_softmax_fusion = False
    provider.bias_activation_fusion = False
    provider.persist_layer_norm = False
    provider.finalize()
    model = provider.provide_distributed_model(wrap_with_ddp=False, use_cpu_initialization=True)
    bridge.save_megatron_model(model, out, hf_tokenizer_path=None, low_memory_save=True)


def export_hf(auto_bridge, hf: str, megatron: str, out: str) -> None:
    """AutoBridge.export_ckpt's steps inside this process's gloo group (the bridge built from `hf`,
    as its docs show). Weights and config.json: `save_hf_pretrained` would also save a tokenizer,
    which the bench's synthetic model does not have."""
    import shutil
    from pathlib import Path

    bridge = auto_bridge.from_hf_pretrained(hf)
    model = bridge.load_megatron_model(megatron, wrap_with_ddp=False)
    bridge.save_hf_weights(model, out, show_progress=False)
    shutil.copy2(Path(hf) / "config.json", Path(out) / "config.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["check", "import", "export"])
    parser.add_argument("--hf")
    parser.add_argument("--megatron")
    parser.add_argument("--out")
    args = parser.parse_args()
    try:
        auto_bridge = import_auto_bridge()
    except ImportError as e:
        sys.exit(f"not installed ({e}); install: {INSTALL}")
    if args.action == "check":
        from importlib.metadata import version

        print(f"megatron-bridge {version('megatron-bridge')}, transformers {version('transformers')}")
        return
    cpu_setup()
    if args.action == "import":
        import_hf(auto_bridge, args.hf, args.out)
    else:
        export_hf(auto_bridge, args.hf, args.megatron, args.out)


if __name__ == "__main__":
    main()
