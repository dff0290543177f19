"""The VLM: discrete and continuous visual embeddings around the GPT, built from a recipe (``build.py``), and inference (held-out losses, generation)."""
