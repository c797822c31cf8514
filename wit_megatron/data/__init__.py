"""WIT data: preprocessing into indexed datasets with per-token roles, and the Megatron dataset that
applies λ at load time. See docs/data.md."""
