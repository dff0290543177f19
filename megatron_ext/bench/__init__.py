"""Benchmarks of the megatron-core side (the speed-up, the training step, packing) and the FLOP model they report with."""
