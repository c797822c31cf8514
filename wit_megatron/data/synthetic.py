"""A synthetic instruction task for runs without data (the no-data demo of the training entry point).

Each sample is one record: a prompt of random tokens, then a response that counts on from the prompt's
last token (each response token is the previous token + 1, wrapping within [1, vocab_size)), then
padding. The response follows a rule a model learns in a few steps while the prompt stays random, so the
response NLL falls and the prompt NLL does not. Samples have the layout of `WITDataset` (unpacked) and
are a pure function of (seed, index).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from wit_megatron.roles import Role, RoleWeights


class SyntheticWITDataset(torch.utils.data.Dataset):
    """`num_samples` samples of `sequence_length` positions over token ids [1, vocab_size)."""

    def __init__(self, num_samples: int, sequence_length: int, vocab_size: int, role_weights: RoleWeights, seed: int = 1234):
        if sequence_length < 4:
            raise ValueError(f"the synthetic task needs sequence_length >= 4, got {sequence_length}")
        self.num_samples, self.seq_length, self.vocab_size, self.seed = num_samples, sequence_length, vocab_size, seed
        self.weight_of_role = role_weights.table()

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, idx: Optional[int]) -> dict[str, torch.Tensor]:
        """Sample `idx`; None gives an all-padding sample."""
        s = self.seq_length
        ids = np.zeros(s + 1, dtype=np.int64)
        roles = np.full(s + 1, int(Role.PROMPT), dtype=np.int64)
        length = 0
        if idx is not None:
            rng = np.random.default_rng((self.seed, idx))
            prompt_length, length = sorted(int(x) for x in rng.choice(np.arange(1, s + 2), size=2, replace=False))
            ids[:prompt_length] = rng.integers(1, self.vocab_size, size=prompt_length)
            steps = np.arange(1, length - prompt_length + 1)
            ids[prompt_length:length] = (ids[prompt_length - 1] - 1 + steps) % (self.vocab_size - 1) + 1
            roles[prompt_length:length] = int(Role.RESPONSE)
        valid = np.arange(1, s + 1) < length  # target t is token t + 1
        target_roles = torch.from_numpy(roles[1:])
        return {
            "tokens": torch.from_numpy(ids[:-1].copy()),
            "labels": torch.from_numpy(ids[1:].copy()),
            "loss_mask": torch.from_numpy(valid.astype(np.float32)),
            "loss_weights": self.weight_of_role[target_roles] * torch.from_numpy(valid),
            "response_mask": (target_roles == int(Role.RESPONSE)) & torch.from_numpy(valid),
            "position_ids": torch.arange(s),
        }
