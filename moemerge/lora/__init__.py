"""LoRA adapters: read into a merge (`base+adapter` references) and extracted from a fine-tune."""
