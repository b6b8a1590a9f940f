"""Expert extraction: dense models or a pruned MoE out of an MoE (the workflow is in `run.py`).

The package itself is callable, so that `moemerge.split(model, out, ...)` is the API function and
`moemerge.split.run`, `moemerge.split.usage`... stay ordinary submodules.
"""

import sys
import types


class _CallablePackage(types.ModuleType):
    def __call__(self, *args, **kwargs):
        from moemerge.api import split

        return split(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
