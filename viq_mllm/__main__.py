"""``python -m viq_mllm ...`` (what ``torchrun -m viq_mllm`` runs). The guard matters: dist_checkpointing
spawns a multiprocessing Manager that re-imports ``__main__``."""

import sys

from viq_mllm.cli import main

if __name__ == "__main__":
    sys.exit(main())
