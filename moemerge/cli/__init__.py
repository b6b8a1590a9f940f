"""Command-line entry points; each wires config → plan → io → methods for one job."""
