"""Core: errors, device support, distributed helpers, seeding, logging and signals; imports nothing else of ext."""
