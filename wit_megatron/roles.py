"""Per-token role codes and the λ weight given to each role.

A role code is stored per token (uint8) by the dataset builder; λ is applied at load time, so one
preprocessing run serves a whole λ sweep. PROMPT is the generic non-response role; SYSTEM, USER and
TOOL refine it where the source format says so and take the prompt's λ unless given their own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import IntEnum
from typing import Optional

import torch


class Role(IntEnum):
    PROMPT = 0
    RESPONSE = 1
    SYSTEM = 2
    USER = 3
    TOOL = 4


@dataclass(frozen=True)
class RoleWeights:
    """λ per role: λ_p (`prompt`) and λ_r (`response`); system/user/tool default to λ_p."""

    prompt: float
    response: float
    system: Optional[float] = None
    user: Optional[float] = None
    tool: Optional[float] = None

    def __post_init__(self):
        for name, value in self._by_name().items():
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise TypeError(f"λ for role '{name}' must be a number, got {value!r}")
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"λ for role '{name}' must be finite and >= 0, got {value}")
        if all(v == 0 for v in self._by_name().values()):
            raise ValueError(
                "every λ is 0 (λ_p = λ_r = 0): no token would carry loss. "
                "Use λ_r > 0 (λ_p = 0, λ_r = 1 is conventional instruction tuning)."
            )

    def _by_name(self) -> dict[str, float]:
        p = self.prompt
        return {
            "prompt": p,
            "response": self.response,
            "system": p if self.system is None else self.system,
            "user": p if self.user is None else self.user,
            "tool": p if self.tool is None else self.tool,
        }

    def table(self) -> torch.Tensor:
        """float32 [len(Role)]: λ indexed by role code."""
        by_name = self._by_name()
        return torch.tensor([by_name[r.name.lower()] for r in Role], dtype=torch.float32)
