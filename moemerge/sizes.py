"""One way to say sizes on the command line and in the API: shard sizes as mergekit reads them, memory with units.

mergekit reads `--out-shard-size` with K/M/B suffixes meaning thousand, million and *billion* (its help calls
the number "parameters"; its writer compares it with tensor bytes), so `5B` is five billion bytes there and here.
A unit ending in a byte sign (`KB`, `MB`, `GB`, `TB`, `MiB`...) is bytes (decimal, as Hugging Face counts).
Memory budgets must carry a unit: `--max-memory 4` is more likely a forgotten `G` than four bytes.
"""

from __future__ import annotations

import re

COUNT_UNITS = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}
# "1B" (billion), "500M", "5G", "5GB", "2.5GiB" (binary), "1000000"
SIZE_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:([KMGT])(I?)B|([KMBGT]?))\s*$", re.IGNORECASE)

MIN_SHARD_BYTES = 10**4  # below this every tensor of a real model gets its own file (toy tests use 20K)
MIN_MEMORY_BYTES = 10**7  # below this no real tensor fits: the run would go one tensor at a time anyway


def _parse(text: str | int, what: str, units_required: bool) -> int:
    if isinstance(text, int):
        return text
    match = SIZE_PATTERN.match(text)
    if not match:
        example = "4G or 500M" if units_required else "5B (billion, as mergekit), 5GB or 500M"
        raise ValueError(f"{what}: cannot read {text!r}; write a number with a unit, e.g. {example}")
    number, byte_unit, binary, count_unit = float(match[1]), match[2], match[3], match[4]
    if byte_unit:
        power = "KMGT".index(byte_unit.upper()) + 1
        return int(number * (1024**power if binary else 1000**power))
    if units_required and not count_unit:
        raise ValueError(f"{what}: {text!r} has no unit; write e.g. {match[1]}G for gigabytes or {match[1]}M")
    return int(number * COUNT_UNITS[count_unit.upper()])


def parse_shard_size(text: str | int) -> int:
    """Largest output shard in bytes: `5B` = 5×10⁹ as in mergekit, `500M`, `5GB`, or a plain byte count."""
    size = _parse(text, "--out-shard-size", units_required=False)
    if size < MIN_SHARD_BYTES:
        raise ValueError(
            f"--out-shard-size: {text!r} is {size} bytes, which would give one file per tensor; "
            f"use at least 10K (mergekit's default is 5B)"
        )
    return size


def parse_memory(text: str | int | None) -> int | None:
    """A memory budget in bytes (`4G`, `512M`, `auto` → None); a bare number is refused, units are required."""
    if text is None or (isinstance(text, str) and text.strip().lower() == "auto"):
        return None
    size = _parse(text, "--max-memory", units_required=True)
    if size < MIN_MEMORY_BYTES:
        raise ValueError(f"--max-memory: {text!r} is {size} bytes, too small to hold a tensor; use at least 10M")
    return size


def format_bytes(size: int) -> str:
    """`1.23 GB`, `45.6 MB`, `789 kB`: decimal units, three significant figures."""
    for unit, scale in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if size >= scale:
            value = size / scale
            return f"{value:.3g} {unit}" if value < 100 else f"{value:.0f} {unit}"
    return f"{size} B"
