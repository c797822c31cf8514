"""Process start-up: the CPU layer, parallel layouts and megatron-core version differences."""
