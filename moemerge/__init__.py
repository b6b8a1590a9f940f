"""moemerge: merge pre-trained language models from YAML recipes."""

__version__ = "0.1.0"
