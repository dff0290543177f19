"""Running a job: process groups, the megatron-core training loop, checkpoints, and the text-LM run kind."""
