"""Synthetic instruction batches with known roles, for tests, the CPU demo and benchmarks."""

from __future__ import annotations

from typing import Iterator, Optional, Sequence

import torch

from wit_megatron.roles import Role, RoleWeights


def synthetic_batch(
    num_seqs: int,
    seq_len: int,
    vocab_size: int,
    weights: RoleWeights,
    seed: int = 0,
    prompt_only: Sequence[int] = (),
    lengths: Optional[Sequence[int]] = None,
) -> dict[str, torch.Tensor]:
    """A global batch of `num_seqs` padded sequences [num_seqs, seq_len] of random tokens.

    Sequence i has a random prompt, then a random response, then padding, so token counts differ a
    lot between sequences; `lengths` (tokens per sequence, 3..seq_len+1) fixes them instead.
    Sequences listed in `prompt_only` have no response tokens.
    Targets are shifted like Megatron's: target t is token t+1 and carries that token's role's λ.
    """
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab_size, (num_seqs, seq_len + 1), generator=gen)
    roles = torch.full((num_seqs, seq_len + 1), int(Role.PROMPT), dtype=torch.uint8)
    valid = torch.zeros(num_seqs, seq_len + 1, dtype=torch.bool)
    for i in range(num_seqs):
        length = int(torch.randint(3, seq_len + 2, (1,), generator=gen)) if lengths is None else lengths[i]
        prompt_len = int(torch.randint(1, length - 1, (1,), generator=gen))
        valid[i, :length] = True
        if i not in prompt_only:
            roles[i, prompt_len:length] = int(Role.RESPONSE)
        ids[i, length:] = 0  # padding id
    target_valid = valid[:, 1:]
    target_roles = roles[:, 1:]
    loss_weights = weights.table()[target_roles.long()] * target_valid
    return {
        "tokens": ids[:, :-1].contiguous(),
        "labels": ids[:, 1:].contiguous(),
        "position_ids": torch.arange(seq_len).expand(num_seqs, seq_len).contiguous(),
        "loss_mask": target_valid.float(),
        "loss_weights": loss_weights.float(),
        "response_mask": (target_roles == int(Role.RESPONSE)) & target_valid,
    }


def synthetic_packed_batch(num_seqs: int, seq_len: int, vocab_size: int, weights: RoleWeights, seed: int = 0,
                           records_per_seq: int = 3) -> dict[str, torch.Tensor]:
    """Like `synthetic_batch`, with up to `records_per_seq` records packed into each sequence the way
    WITDataset packs them: each record's targets (a prompt, then a response) follow the previous
    record's, position_ids restart per record, `document_ids` numbers the records (-1 on the
    trailing padding, whose targets have loss_mask and weight 0)."""
    gen = torch.Generator().manual_seed(seed)
    out = {k: torch.zeros(num_seqs, seq_len, dtype=dtype) for k, dtype in (
        ("tokens", torch.int64), ("labels", torch.int64), ("position_ids", torch.int64), ("loss_mask", torch.float32),
        ("loss_weights", torch.float32), ("response_mask", torch.bool))}
    out["document_ids"] = torch.full((num_seqs, seq_len), -1, dtype=torch.int64)
    table = weights.table()
    for i in range(num_seqs):
        p = 0
        for j in range(records_per_seq):
            n = min(int(torch.randint(4, seq_len // 2, (1,), generator=gen)), seq_len - p)  # targets of the record
            if n < 2:
                break
            ids = torch.randint(1, vocab_size, (n + 1,), generator=gen)
            prompt = int(torch.randint(1, n, (1,), generator=gen))  # targets [0, prompt) are prompt tokens
            roles = torch.full((n,), int(Role.RESPONSE), dtype=torch.long)
            roles[:prompt] = int(Role.PROMPT)
            span = slice(p, p + n)
            out["tokens"][i, span], out["labels"][i, span] = ids[:-1], ids[1:]
            out["position_ids"][i, span] = torch.arange(n)
            out["loss_mask"][i, span] = 1.0
            out["loss_weights"][i, span] = table[roles]
            out["response_mask"][i, span] = roles == int(Role.RESPONSE)
            out["document_ids"][i, span] = j
            p += n
    return out


def micro_batches(batch: dict[str, torch.Tensor], start: int, stop: int, micro_batch_size: int) -> Iterator[dict]:
    """Micro-batches of rows [start, stop) of a global batch (one data-parallel rank's share)."""
    for i in range(start, stop, micro_batch_size):
        yield {k: v[i : i + micro_batch_size] for k, v in batch.items()}
