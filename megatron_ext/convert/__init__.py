"""Moving weights in and out: HF <-> megatron-core mappings and growing a checkpoint to an extended vocabulary."""
