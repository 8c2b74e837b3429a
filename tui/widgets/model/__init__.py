"""The Model tab: the base model's source and precision, its memory estimate, loading, and the
inspector (architecture, linear-module groups, tokenizer)."""
