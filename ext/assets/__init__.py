"""Small tokenizer and corpora shipped with the package for CPU runs and tests."""
