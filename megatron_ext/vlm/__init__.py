"""The VLM: discrete and continuous visual embeddings around the GPT, its run kinds (VLM pretrain / SFT, the ViQ tokenizer stages) and inference (held-out losses, generation)."""
