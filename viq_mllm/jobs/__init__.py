"""The torch-only jobs: offline code extraction (``tokenize``), the end-to-end demo and the ViQ stage chain. The
jobs that train through megatron-core are ``megatron_ext.jobs``."""
