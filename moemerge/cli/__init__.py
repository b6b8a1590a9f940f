"""Command-line entry points; each wires config → plan → io → methods for one job."""

import os

# Large tensors on transparent huge pages: torch reads this once, at its first allocation, so it is set before
# torch is imported. Measured on the TIES benchmark (2 cores): page-fault time 24 → 16 s, wall 51 → 38 s.
# THP_MEM_ALLOC_ENABLE=0 in the environment turns it off.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
