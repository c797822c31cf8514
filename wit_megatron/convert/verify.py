"""Compare a converted Megatron checkpoint with its Hugging Face model on the same tokens.

`megatron_logits` runs on every rank of a launcher (torchrun, or `run_distributed`): it builds the
model at a parallel layout, loads the checkpoint through megatron-core's dist_checkpointing, and runs
a forward-only pipeline schedule; the last stage gathers the vocab-parallel logits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from wit_megatron import checkpoint as ckpt
from wit_megatron.model import GPTArch, build_model, check_layout, transformer_config
from wit_megatron.runtime.parallel import ParallelLayout, init_model_parallel


def megatron_logits(checkpoint: str, layout: tuple, tokens: torch.Tensor, dtype: torch.dtype = torch.float32,
                    hf_config: Optional[str] = None) -> dict:
    """Logits [b, s, vocab] (padding rows removed) of `tokens` [b, s] at `layout` = (tp, pp, vpp).

    Returns {"logits": tensor or None (only the last stage's TP/DP rank 0 holds them),
    "missing": set, "unexpected": set} (checkpoint keys the model lacked / did not request)."""
    chunks, arch, missing, unexpected = load_model(checkpoint, layout, dtype, hf_config)
    return {"logits": model_logits(chunks, arch, tokens), "missing": missing, "unexpected": unexpected}


def load_model(checkpoint: str, layout: tuple, dtype: torch.dtype = torch.float32, hf_config: Optional[str] = None) -> tuple:
    """(this rank's model chunks, GPTArch, missing keys, unexpected keys) of a checkpoint loaded at
    `layout` = (tp, pp, vpp) through megatron-core's dist_checkpointing (`hf_config`: see
    `checkpoint.open_checkpoint`)."""
    opened = ckpt.open_checkpoint(Path(checkpoint), hf_config)
    arch = opened.arch
    layout = ParallelLayout(*layout)
    check_layout(arch, layout)
    init_model_parallel(layout)
    config = transformer_config(arch, layout, dtype, calculate_per_token_loss=False)
    chunks = build_model(arch, config)
    missing, unexpected = ckpt.load_into_model(chunks, opened.directory)
    return chunks, arch, missing, unexpected


def model_logits(chunks, arch: GPTArch, tokens: torch.Tensor) -> Optional[torch.Tensor]:
    """Logits [b, s, vocab] (padding rows removed) of this rank's model chunks (any layout, DDP-wrapped
    or not) on `tokens` [b, s], through a forward-only pipeline schedule; returned on the last
    stage's TP/DP rank 0, None elsewhere."""
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from wit_megatron.model import unwrap

    for chunk in chunks:
        chunk.eval()
    device = next(unwrap(chunks[0]).parameters()).device  # CUDA when the model was built on a GPU
    batch, seq = tokens.shape
    tokens = tokens.to(device)
    positions = torch.arange(seq, device=device).unsqueeze(0).expand(batch, seq)
    gathered = []
    # With calculate_per_token_loss the schedule expects (loss, num_tokens, report), else (loss, report).
    per_token = unwrap(chunks[0]).config.calculate_per_token_loss

    def loss_func(output: torch.Tensor):
        full = tensor_parallel.gather_from_tensor_model_parallel_region(output)  # [b, s, padded vocab]
        gathered.append(full[..., : arch.tokenizer_vocab_size].float().cpu())
        zero = output.sum() * 0.0
        return (zero, torch.tensor(1, dtype=torch.int, device=device), {}) if per_token else (zero, {})

    def forward_step(data_iterator, model):
        return model(tokens, positions, None), loss_func

    # The interleaved schedule needs a multiple of pp micro-batches: repeat the batch, keep the first.
    vpp = len(chunks) > 1
    micro_batches = ps.get_pipeline_model_parallel_world_size() if vpp else 1
    with torch.no_grad():
        get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=[iter([None] * micro_batches) for _ in chunks] if vpp else iter([None]),
            model=list(chunks) if vpp else chunks[0],
            num_microbatches=micro_batches, seq_length=seq, micro_batch_size=batch, forward_only=True,
        )
    keep = (ps.is_pipeline_last_stage(ignore_virtual=True) and ps.get_tensor_model_parallel_rank() == 0
            and ps.get_data_parallel_rank() == 0)
    return gathered[0] if keep else None


def hf_logits(hf_dir: Path, tokens: torch.Tensor) -> torch.Tensor:
    """The HF model's logits [b, s, vocab] in fp32."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return model(tokens).logits.float()


def compare(hf: torch.Tensor, megatron: torch.Tensor, tokens: torch.Tensor) -> dict:
    """max/mean |Δlogit|, top-1 agreement and next-token loss of each (logits [b, s, vocab], tokens [b, s])."""
    diff = (hf - megatron).abs()

    def loss(logits):
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1)).item()

    return {
        "max_abs_diff": diff.max().item(),
        "mean_abs_diff": diff.mean().item(),
        "top1_agreement": (hf.argmax(-1) == megatron.argmax(-1)).float().mean().item(),
        "hf_loss": loss(hf),
        "megatron_loss": loss(megatron),
    }


def default_tokens(vocab: int, batch: int = 2, seq: int = 16, seed: int = 0, tokenizer_dir: Optional[Path] = None) -> torch.Tensor:
    """A few prompts through the tokenizer when there is one, else seeded random ids [b, s]."""
    if tokenizer_dir is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        prompts = ["The capital of France is", "def fibonacci(n):\n    "]
        ids = [tokenizer(p)["input_ids"] for p in prompts]
        seq = min(len(i) for i in ids)
        return torch.tensor([i[:seq] for i in ids])
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def run_verification(hf_dir: Path, checkpoint: Path, layout: tuple) -> dict:
    """HF logits here, Megatron logits on tp·pp local gloo ranks (CPU), compared on a few prompts."""
    from wit_megatron.convert.hf_to_mcore import has_tokenizer, read_hf_config
    from wit_megatron.runtime.kernels import in_use
    from wit_megatron.runtime.launch import run_distributed

    read_hf_config(hf_dir)  # a directory with a config.json, and no staging directory
    # A checkpoint written elsewhere (Megatron-LM, Megatron-Bridge) is read with the HF model's config as
    # its template: checked against what the checkpoint says, supplying what it does not.
    root, directory = ckpt.resolve(Path(checkpoint))
    template = None if ckpt.own_record(root, directory) else str(hf_dir)
    arch = ckpt.open_checkpoint(Path(checkpoint), template).arch
    check_layout(arch, ParallelLayout(*layout))
    tokens = default_tokens(arch.tokenizer_vocab_size, tokenizer_dir=hf_dir if has_tokenizer(hf_dir) else None)
    per_rank = run_distributed("wit_megatron.convert.verify:_rank_logits", layout[0] * layout[1],
                               checkpoint=str(checkpoint), layout=layout, tokens=tokens, hf_config=template)
    (megatron,) = [r for r in per_rank if r is not None]
    return dict(compare(hf_logits(hf_dir, tokens), megatron, tokens), layout=list(layout), tokens=list(tokens.shape),
                kernels=in_use())


def _rank_logits(checkpoint: str, layout: tuple, tokens: torch.Tensor, hf_config: Optional[str] = None):
    result = megatron_logits(checkpoint, layout, tokens, hf_config=hf_config)
    if result["missing"] or result["unexpected"]:
        raise RuntimeError(f"checkpoint keys missing {sorted(result['missing'])}, unexpected {sorted(result['unexpected'])}")
    return result["logits"]
