"""Fixed cost of a merge before its first tensor is read: interpreter, imports, recipe, plan (issue 15).

    python scripts/startup_overhead.py            # toy models cached under .bench/toy-startup, 5 runs each

Each run is a fresh process; the first tensor read (`LazyModel._read_range`) stops the clock and exits, so what
is measured is what every merge pays whatever its size. Wall and CPU seconds since the process started
(from /proc/self/stat), median of the runs, beside a bare `python -c pass` and `moemerge-yaml --help`.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".bench" / "toy-startup"

# runs in the child: stop at the first tensor read and report seconds since the process started
PROBE = """
import os, sys, time
ticks = os.sysconf("SC_CLK_TCK")
def since_start():
    boot = float(open("/proc/uptime").read().split()[0])
    started = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19]) / ticks
    return boot - started
from moemerge.io import loader
def first_read(self, *args, **kwargs):
    times = os.times()
    os.write(1, f"PROBE {since_start()} {times.user + times.system}\\n".encode())  # one write: one whole line
    os._exit(0)
loader.LazyModel._read_range = first_read
from moemerge.cli.yaml_command import main
sys.argv = ["moemerge-yaml", *sys.argv[1:]]
main()
"""


def toy_models() -> tuple[Path, Path]:
    from moemerge.toys import make_toy_model

    first, second = CACHE / "first", CACHE / "second"
    if not (second / "config.json").is_file():
        make_toy_model(first, seed=1)
        make_toy_model(second, seed=2, base=first)
    return first, second


def timed(command: list[str]) -> tuple[float, float]:
    started = time.perf_counter()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    _, _, usage = os.wait4(child.pid, 0)
    return time.perf_counter() - started, usage.ru_utime + usage.ru_stime


def main() -> None:
    runs = 5
    first, second = toy_models()
    recipe = CACHE / "linear.yml"
    recipe.write_text(
        f"merge_method: linear\nmodels:\n  - model: {first}\n    parameters: {{weight: 0.5}}\n"
        f"  - model: {second}\n    parameters: {{weight: 0.5}}\ndtype: bfloat16\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    probes = []
    for _ in range(runs):
        output = subprocess.run(
            [sys.executable, "-c", PROBE, str(recipe), str(CACHE / "out"), "--overwrite", "--quiet"],
            capture_output=True,
            text=True,
            env=env,
            check=False,
        ).stdout
        line = next(line for line in output.splitlines() if line.startswith("PROBE"))
        probes.append([float(value) for value in line.split()[1:3]])
    bare = [timed([sys.executable, "-c", "pass"]) for _ in range(runs)]
    call_help = "import sys; from moemerge.cli.yaml_command import main; sys.argv = ['moemerge-yaml', '--help']; main()"
    help_ = [timed([sys.executable, "-c", call_help]) for _ in range(runs)]
    result = {
        "before_first_tensor_wall_s": round(statistics.median(p[0] for p in probes), 3),
        "before_first_tensor_cpu_s": round(statistics.median(p[1] for p in probes), 3),
        "python_pass_wall_s": round(statistics.median(b[0] for b in bare), 3),
        "help_wall_s": round(statistics.median(h[0] for h in help_), 3),
        "help_cpu_s": round(statistics.median(h[1] for h in help_), 3),
        "runs": runs,
        "load_avg_1min": round(os.getloadavg()[0], 1),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
