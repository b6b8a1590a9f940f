"""The `merge_method` names moemerge registers, listed without importing torch.

A recipe is checked against this list while it is parsed, so a mistyped method fails in a fraction of a second
instead of after the 1.4 s import of torch that the method registry needs. A test keeps it equal to the registry.
"""

MERGE_METHODS = (
    "arcee_fusion",
    "breadcrumbs",
    "breadcrumbs_ties",
    "dare_linear",
    "dare_ties",
    "della",
    "della_linear",
    "karcher",
    "linear",
    "model_stock",
    "multislerp",
    "nearswap",
    "nuslerp",
    "passthrough",
    "ram",
    "ramplus_tl",
    "sce",
    "slerp",
    "task_arithmetic",
    "ties",
)
