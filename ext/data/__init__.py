"""Data pipeline: local/HF sources, tokenization, and batches for the trainer."""
