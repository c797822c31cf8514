"""Assemble one training sample from its records in a single compiled pass.

WITDataset.__getitem__ spends its time here: a packed sequence of s = 4096 positions gathers ~20
records' token ids and role codes from the memory-mapped .bin files and writes seven arrays of s.
Done with numpy that is some twenty whole-array passes (index arithmetic, two gathers, a λ lookup,
casts, padding), about 1.8x the time of this one numba-compiled loop, which reads each kept token
and its role once and writes every output at once (bench/bench_data.py, docs/data.md).

Compiled per process on first call (about 1 s; WITDataset calls it at construction, before data
loader workers fork) and not cached on disk: nothing is written next to the package or in $HOME by
every rank of a job.

Layout of the outputs (all length s; p = positions filled by the records, the rest is padding):
    tokens[p]        the input of each target: the record's previous kept token, or, at a record's
                     first target, `record_input` (token 0, or the token before a truncation cut)
    labels[p]        the target ids
    loss_mask[p]     1.0 on targets, 0.0 on padding
    loss_weights[p]  weight_of_role[role of the target], 0.0 on padding
    response_mask[p] the target's role is `response_role`
    position_ids[p]  0, 1, ... restarting at each record; 0 on padding
    document_ids[p]  index of the record within the sample; -1 on padding
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(nogil=True, cache=False)
def assemble_sample(
    records: np.ndarray,  # [k] record ids, in sample order
    record_target: np.ndarray,  # [len(data)] flat index of each record's first kept target
    record_input: np.ndarray,  # [len(data)] flat index of the input before that target
    record_size: np.ndarray,  # [len(data)] targets kept per record
    token_ids: np.ndarray,  # [total tokens] flat token ids (uint16 or int32)
    role_codes: np.ndarray,  # [total tokens] flat uint8 role codes
    weight_of_role: np.ndarray,  # [256] float32 λ per role code
    response_role: int,
    pad_token_id: int,
    tokens: np.ndarray,  # outputs, [s] each: int64
    labels: np.ndarray,  # int64
    loss_mask: np.ndarray,  # float32
    loss_weights: np.ndarray,  # float32
    response_mask: np.ndarray,  # bool
    position_ids: np.ndarray,  # int64
    document_ids: np.ndarray,  # int64
) -> int:
    """Fill the outputs for `records`; returns the number of positions they fill."""
    s = tokens.shape[0]
    p = 0
    for j in range(records.shape[0]):
        record = records[j]
        first = record_target[record]
        n = record_size[record]
        if n < 1 or p + n > s:  # the sample index guarantees neither; guard the unchecked writes below
            raise ValueError("sample index corrupt: a record of the sample is empty or overflows the sequence")
        tokens[p] = token_ids[record_input[record]]
        for i in range(n):
            token = token_ids[first + i]
            role = role_codes[first + i]
            labels[p + i] = token
            if i + 1 < n:
                tokens[p + i + 1] = token
            loss_mask[p + i] = 1.0
            loss_weights[p + i] = weight_of_role[role]
            response_mask[p + i] = role == response_role
            position_ids[p + i] = i
            document_ids[p + i] = j
        p += n
    for q in range(p, s):
        tokens[q] = pad_token_id
        labels[q] = pad_token_id
        loss_mask[q] = 0.0
        loss_weights[q] = 0.0
        response_mask[q] = False
        position_ids[q] = 0
        document_ids[q] = -1
    return p
