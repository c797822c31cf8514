"""Carry a micro-batch, float per-token weights included, to the ranks and stages that need it.

Like Megatron-LM's `get_batch_on_this_tp_rank`, only tensor-parallel rank 0 reads the data iterator;
it broadcasts to its TP group. Each pipeline stage receives only what it uses:

    first stage:  tokens, position_ids
    last stage:   labels, loss_mask, loss_weights (float32), response_mask
    every stage:  document_ids (packed sequences: every attention layer needs the record boundaries)

Shapes travel in a small fixed header, so micro-batches may change shape (packed sequences).
After the broadcast, context-parallel ranks keep their load-balanced slice of every sequence
dimension, `loss_weights` sliced exactly like `labels`.
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch

from wit_megatron.loss import check_loss_weights
from wit_megatron.runtime import compat

FIRST_STAGE_KEYS = ("tokens", "position_ids")
LAST_STAGE_KEYS = ("labels", "loss_mask", "loss_weights", "response_mask")
EVERY_STAGE_KEYS = ("document_ids",)
BATCH_KEYS = FIRST_STAGE_KEYS + LAST_STAGE_KEYS + EVERY_STAGE_KEYS

# dtypes a batch tensor may have; the header carries the index. No key is ever re-typed in transit.
_DTYPES = (torch.int64, torch.int32, torch.float32, torch.bfloat16, torch.float16, torch.bool, torch.uint8)
_MAX_DIMS = 4
_FIELDS = 3 + _MAX_DIMS  # present, dtype index, ndim, shape


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def keys_for_stage(first: bool, last: bool) -> tuple[str, ...]:
    keys = EVERY_STAGE_KEYS
    if first:
        keys = FIRST_STAGE_KEYS + keys
    if last:
        keys = keys + LAST_STAGE_KEYS
    return keys


def _encode_header(batch: dict, keys: tuple[str, ...]) -> torch.Tensor:
    header = torch.zeros(len(keys), _FIELDS, dtype=torch.int64)
    for i, key in enumerate(keys):
        t = batch.get(key)
        if t is None:
            continue
        if t.dtype not in _DTYPES:
            raise TypeError(f"batch tensor '{key}' has unsupported dtype {t.dtype}")
        if t.dim() > _MAX_DIMS:
            raise ValueError(f"batch tensor '{key}' has {t.dim()} dims; at most {_MAX_DIMS} are supported")
        header[i, 0] = 1
        header[i, 1] = _DTYPES.index(t.dtype)
        header[i, 2] = t.dim()
        header[i, 3 : 3 + t.dim()] = torch.tensor(t.shape, dtype=torch.int64)
    return header


def get_batch(
    data_iterator: Optional[Iterator[dict]],
    vp_stage: Optional[int] = None,
) -> dict[str, Optional[torch.Tensor]]:
    """Read, broadcast and CP-slice one micro-batch for this rank's stage.

    Args:
        data_iterator: yields dicts of CPU (or device) tensors keyed by BATCH_KEYS, each [b, s].
            `document_ids` (packed sequences; optional) numbers the records inside each sequence,
            -1 on padding. Needed on TP rank 0 only.
        vp_stage: the model chunk (virtual pipeline stage) the batch is for, or None without VPP.

    Returns a dict with every key of BATCH_KEYS; keys this stage does not use, or that the source
    did not provide (`loss_weights`, `response_mask`, `position_ids`, `document_ids` are optional
    here; the WIT loss itself requires `loss_weights`), are None.
    """
    from megatron.core import parallel_state as ps

    first = ps.is_pipeline_first_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage)
    last = ps.is_pipeline_last_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage)
    keys = keys_for_stage(first, last)
    device = _device()
    group = ps.get_tensor_model_parallel_group()
    src = ps.get_tensor_model_parallel_src_rank()
    tp_size = ps.get_tensor_model_parallel_world_size()

    if ps.get_tensor_model_parallel_rank() == 0:
        if data_iterator is None:
            raise ValueError("tensor-parallel rank 0 needs a data iterator")
        source = next(data_iterator)
        missing = [k for k in ("tokens", "labels", "loss_mask") if k in keys and source.get(k) is None]
        if missing:
            raise KeyError(f"micro-batch lacks {missing}; it has {sorted(k for k, v in source.items() if v is not None)}")
        if source.get("loss_weights") is not None and "loss_weights" in keys:
            check_loss_weights(source["loss_weights"])  # on the host, before any device transfer
        header = _encode_header(source, keys).to(device)
        if tp_size > 1:
            torch.distributed.broadcast(header, src, group=group)
        batch = {k: (source[k].to(device, non_blocking=True) if source.get(k) is not None else None) for k in keys}
        if tp_size > 1:
            for k in keys:
                if batch[k] is not None:
                    torch.distributed.broadcast(batch[k], src, group=group)
    else:
        header = torch.empty(len(keys), _FIELDS, dtype=torch.int64, device=device)
        torch.distributed.broadcast(header, src, group=group)
        batch = {}
        for k, row in zip(keys, header.tolist()):
            if not row[0]:
                batch[k] = None
                continue
            shape = row[3 : 3 + row[2]]
            batch[k] = torch.empty(shape, dtype=_DTYPES[row[1]], device=device)
            torch.distributed.broadcast(batch[k], src, group=group)

    if batch.get("document_ids") is not None and ps.get_context_parallel_world_size() > 1:
        # Packed records need per-record (THD) CP slicing, which is not implemented: refuse, don't drift.
        raise NotImplementedError("packed sequences (document_ids) with context parallelism are not supported yet")
    sliced = compat.slice_for_context_parallel({k: v for k, v in batch.items() if v is not None})
    return {k: sliced.get(k) for k in BATCH_KEYS}


def packed_attention_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """[b, 1, s, s] bool mask (True = masked out) for packed sequences on the local attention path:
    causal within each record, nothing across records. Padding (-1) attends causally among itself."""
    same_record = document_ids.unsqueeze(-1) == document_ids.unsqueeze(-2)
    s = document_ids.shape[-1]
    causal = torch.ones(s, s, dtype=torch.bool, device=document_ids.device).tril()
    return ~(same_record & causal).unsqueeze(1)


def packed_seq_params(document_ids: torch.Tensor):
    """Transformer Engine THD metadata (cu_seqlens) for a micro-batch of packed sequences.

    `document_ids` is [b, s]; the THD layout treats the micro-batch as one flat sequence of b*s tokens
    (see `flatten_for_thd`). A segment starts at every row start and wherever the record changes;
    trailing padding is one more segment, so cu_seqlens covers all b*s tokens.
    """
    from megatron.core.packed_seq_params import PackedSeqParams

    b, s = document_ids.shape
    flat = document_ids.reshape(-1)
    boundary = torch.zeros_like(flat, dtype=torch.bool)
    boundary[1:] = flat[1:] != flat[:-1]
    boundary[::s] = True  # rows never share a segment, even when their ids agree
    starts = torch.nonzero(boundary).flatten()
    end = torch.full((1,), b * s, dtype=starts.dtype, device=flat.device)
    cu_seqlens = torch.cat([starts, end]).to(torch.int32)
    max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    return PackedSeqParams(
        qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
        max_seqlen_q=max_seqlen, max_seqlen_kv=max_seqlen,
    )


def flatten_for_thd(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """[b, s] -> [1, b*s]: the one flat sequence that THD attention and `packed_seq_params` describe."""
    return None if t is None else t.reshape(1, -1)
