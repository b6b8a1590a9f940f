"""Vocabularies: the output tokenizer, each input's row map onto it, and the chat template."""
