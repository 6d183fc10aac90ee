"""Model side: the [attention] section, masks, segment-aware attention, the Llama-3 and Qwen3 families, MoE, weight tying and the Hugging Face adapters."""
