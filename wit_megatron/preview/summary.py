"""Per dataset (one preprocessed prefix): records, tokens per role, the share of targets λ gives weight,
and the records that show the classic template-masking bugs, named by record.

Counted over every record as preprocessing wrote it (before load-time truncation); a target is every
token but a record's first (which is only ever an input). Flagged:
    no response       records without a single response token (nothing of the answer is trained)
    one role          records whose every token has the same role (e.g. a template that labels the
                      whole conversation as response, or a response lost entirely)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from wit_megatron.preview.view import ROLE_NAMES
from wit_megatron.roles import Role, RoleWeights


@dataclass
class DatasetSummary:
    prefix: str
    records: int
    tokens: int
    tokens_per_role: dict[str, int]
    targets_per_role: dict[str, int]
    weight_per_role: dict[str, float]
    targets: int
    weighted_targets: int  # targets whose λ is not 0
    no_response: list[int] = field(default_factory=list)
    one_role: dict[int, str] = field(default_factory=dict)  # record -> its only role

    @property
    def weighted_fraction(self) -> float:
        return self.weighted_targets / self.targets if self.targets else 0.0

    def as_dict(self) -> dict:
        return {"prefix": self.prefix, "records": self.records, "tokens": self.tokens,
                "tokens_per_role": self.tokens_per_role, "targets_per_role": self.targets_per_role,
                "weight_per_role": self.weight_per_role, "targets": self.targets, "weighted_targets": self.weighted_targets,
                "weighted_fraction": self.weighted_fraction, "records_without_response": self.no_response,
                "records_of_one_role": {str(k): v for k, v in self.one_role.items()}}


def summarize(prefix: str, role_weights: RoleWeights) -> DatasetSummary:
    from wit_megatron.data.indexed import WITIndexedData

    data = WITIndexedData(prefix)
    roles = np.asarray(data.roles)
    codes = len(ROLE_NAMES)
    if len(roles) and int(roles.max()) >= codes:
        bad = int(np.flatnonzero(roles >= codes)[0])
        record = int(np.searchsorted(data.starts, bad, side="right") - 1)
        raise ValueError(f"{prefix}: record {record} has role code {int(roles[bad])}, not one of {ROLE_NAMES}")
    is_target = np.ones(len(roles), dtype=bool)
    is_target[data.starts[data.lengths > 0]] = False
    tokens = np.bincount(roles, minlength=codes)
    targets = np.bincount(roles[is_target], minlength=codes)
    weights = role_weights.table().numpy()
    nonempty = data.lengths > 0
    starts = data.starts[nonempty]
    records = np.flatnonzero(nonempty)
    responses = np.add.reduceat((roles == int(Role.RESPONSE)).astype(np.int64), starts) if len(starts) else np.zeros(0)
    lowest = np.minimum.reduceat(roles, starts) if len(starts) else np.zeros(0)
    highest = np.maximum.reduceat(roles, starts) if len(starts) else np.zeros(0)
    one_role = records[lowest == highest]
    return DatasetSummary(
        prefix=prefix, records=len(data), tokens=int(len(roles)),
        tokens_per_role={ROLE_NAMES[c]: int(tokens[c]) for c in range(codes) if tokens[c]},
        targets_per_role={ROLE_NAMES[c]: int(targets[c]) for c in range(codes) if tokens[c]},
        weight_per_role={ROLE_NAMES[c]: float(weights[c]) for c in range(codes) if tokens[c]},
        targets=int(is_target.sum()), weighted_targets=int(targets[weights != 0].sum()),
        no_response=[int(r) for r in records[responses == 0]] + [int(r) for r in np.flatnonzero(~nonempty)],
        one_role={int(r): ROLE_NAMES[int(lowest[i])] for i, r in zip(np.flatnonzero(lowest == highest), one_role)})
