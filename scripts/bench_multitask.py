"""Mixed-task batch benchmarks behind README's "many tasks" table: each a ``deltatune bench --multitask`` run.

    PYTHONPATH=. python scripts/bench_multitask.py                  # all of them (about 30 min on 2 busy cores)
    PYTHONPATH=. python scripts/bench_multitask.py --only multitask_vit_small   # some (names below)

Each run writes ``benchmarks/<name>.md`` and ``.json``. ``--threads 1 --clock cpu`` runs are the
noise-robust companions of the wall-clock runs at the default thread count (on a shared machine other processes'
time lands in the wall clock; with one thread the process's CPU time leaves it out).
"""

from __future__ import annotations

import argparse
import subprocess
import sys

OFFLINE = ["--model", "deltatune_offline_vit", "--img-size", "32", "--batch", "32"]
VIT_SMALL = ["--model", "vit_small_patch16_224", "--img-size", "112", "--batch", "32"]  # the main bench's model
CPU_CLOCK = ["--threads", "1", "--clock", "cpu"]
FACT_ADAPTFORMER = ["--methods", "fact-tt,adaptformer"]
MAIN3 = ["--methods", "ssf,bitfit,lora"]
RUNS: dict[str, list[str]] = {  # benchmarks/<name>.md and .json
    "multitask": [*OFFLINE, *CPU_CLOCK, "--steps", "15"],
    "multitask_wall": [*OFFLINE, "--steps", "15"],
    "multitask_vit_small": [*VIT_SMALL, *CPU_CLOCK, "--steps", "8"],
    "multitask_vit_small_wall": [*VIT_SMALL, "--steps", "8"],
    "multitask_compiled": [*OFFLINE, *CPU_CLOCK, "--steps", "10", "--compile"],
    "multitask_vit_small_compiled": [*VIT_SMALL, *CPU_CLOCK, "--steps", "6", "--compile", *MAIN3],
    "multitask_ia3_vit_small_wall": [*VIT_SMALL, "--steps", "8", "--methods", "ia3"],
    "multitask_fact_adaptformer_vit_small": [*VIT_SMALL, *CPU_CLOCK, "--steps", "8", *FACT_ADAPTFORMER],
    "multitask_fact_adaptformer_vit_small_wall": [*VIT_SMALL, "--steps", "8", *FACT_ADAPTFORMER],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=list(RUNS), default=list(RUNS))
    parser.add_argument("--tasks", default="1,4,16", help="task counts N")
    ns = parser.parse_args()
    for name in ns.only:
        out = f"benchmarks/{name}"
        argv = ["--device", "cpu", "--multitask", ns.tasks, *RUNS[name], "--json", f"{out}.json", "--md", f"{out}.md"]
        print("deltatune bench", " ".join(argv), flush=True)
        subprocess.run([sys.executable, "-m", "deltatune.bench", *argv], check=True)  # a fresh process per setting


if __name__ == "__main__":
    main()
