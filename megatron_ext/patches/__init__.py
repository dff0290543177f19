"""Every runtime patch this project applies to megatron-core, and nothing else."""
