"""The one error family for things a user got wrong; the CLI prints it as one line."""


def install_hint(extra: str, packages: str) -> str:
    """How to get an optional extra: the packages themselves, or the extra from a checkout (moemerge is not on PyPI)."""
    return f"pip install {packages}, or from a moemerge checkout: pip install -e '.[{extra}]'"


class MoemergeError(Exception):
    """A problem with the user's recipe, inputs or environment (not a bug in moemerge)."""


class ConfigError(MoemergeError):
    """The recipe is malformed: unknown key, bad value, missing parameter."""


class ModelNotFoundError(MoemergeError):
    """A model reference resolves to nothing on disk or in the Hugging Face cache."""


class TensorError(MoemergeError):
    """A tensor is missing, has the wrong shape, or cannot be read safely."""


class OutputError(MoemergeError):
    """The output folder cannot be written (exists, disk full, permissions)."""
