"""Benchmarks of the tokenizer side (encode, offline extraction) and what every benchmark shares (timing, tables, JSON)."""
