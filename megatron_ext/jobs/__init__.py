"""The run kinds and pipelines built on the adapter: a text LM, the VLM, the ViQ stages that run through an LLM,
the ``init.hf`` start and the HF export. Each imports the adapter (model, training engine, checkpoints,
conversion) and nothing imports a job but the command line and the benchmark drivers."""
