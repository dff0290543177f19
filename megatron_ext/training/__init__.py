"""Running a job: process groups, the megatron-core training loop, checkpoints, with no run kind in it (those are ``megatron_ext.jobs``)."""
