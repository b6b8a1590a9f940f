"""moemerge: merge pre-trained language models from YAML recipes.

    import moemerge
    moemerge.merge("recipe.yml", "out/merged")          # what moemerge-yaml does
    moemerge.build_moe("moe.yml", "out/moe")            # what moemerge-moe does
    moemerge.split("out/moe", "out/expert", expert=0)   # what moemerge-split does
    tensors = moemerge.merge_state_dict({...})           # in memory, nothing written

Importing the package is cheap: torch loads on the first call that needs it.
"""

__version__ = "0.1.0"

from moemerge import split  # noqa: E402  (a callable package: moemerge.split(model, out, ...) is moemerge.api.split)
from moemerge.api import (  # noqa: E402  (after __version__, which the CLI reads without the API)
    WriteOptions,
    build_moe,
    iter_merged,
    load_recipe,
    merge,
    merge_state_dict,
    plan_merge,
)
from moemerge.io.summary import WriteSummary  # noqa: E402

__all__ = [
    "__version__",
    "WriteOptions",
    "WriteSummary",
    "build_moe",
    "iter_merged",
    "load_recipe",
    "merge",
    "merge_state_dict",
    "plan_merge",
    "split",
]
