"""Training data in megatron-core's formats: the prepared, memory-mapped documents and their cached packing."""
