"""What a Ray Train run costs before and after its training function: the fixed price every stage (pretraining,
each round) and every test that trains pays, whatever the model.

    python bench/train_overhead.py [--fits 3] [--out bench/results/train_overhead.json]

For each Train controller health-check interval (Ray's default 2 s, and the 0.5 s the tests set in
``tests/conftest.py``), a fresh local Ray (2 CPUs, as the tests start it) in a subprocess runs ``--fits``
``TorchTrainer.fit`` calls of one worker whose function only writes down the time it started. Per fit: seconds from
``fit()`` to the function's first line (controller and worker actors, their imports, the process group), and
from its report to ``fit()`` returning. Then, on the same Ray, the seconds to a first answer from a new actor
that imports nothing, and from one that imports torch, ``ray.train.torch`` and timm (what a Train worker of
raysemi imports before it trains). Prints a Markdown table and writes JSON with the machine it ran on.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

INTERVALS = ("2.0", "0.5")


def measure(fits: int) -> dict[str, Any]:
    """In this process (a fresh one): ``fits`` trivial Train runs, then the two actor start-ups."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)

    def started(config: dict[str, Any]) -> None:
        Path(config["stamp"]).write_text(repr(time.time()))  # the worker's clock is this machine's

    rows = []
    with tempfile.TemporaryDirectory() as storage:
        for i in range(fits):
            stamp = Path(storage) / f"started-{i}"
            t0 = time.time()
            TorchTrainer(started, train_loop_config={"stamp": str(stamp)},
                         scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 0.5}),
                         run_config=RunConfig(storage_path=storage, name=f"fit{i}")).fit()
            t1 = time.time()
            began = float(stamp.read_text())
            rows.append({"to_function_s": round(began - t0, 2), "after_function_s": round(t1 - began, 2),
                         "total_s": round(t1 - t0, 2)})

    @ray.remote(num_cpus=0.5)
    class Bare:
        def ready(self) -> bool:
            return True

    @ray.remote(num_cpus=0.5)
    class Importing:
        def ready(self) -> bool:
            import ray.train.torch  # noqa: F401
            import timm  # noqa: F401
            import torch  # noqa: F401

            return True

    actors = {}
    for name, cls in (("bare", Bare), ("torch_timm", Importing)):
        t0 = time.time()
        handle = cls.remote()
        ray.get(handle.ready.remote())
        actors[name] = round(time.time() - t0, 2)
        ray.kill(handle)
    ray.shutdown()
    return {"fits": rows, "actor_first_answer_s": actors}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fits", type=int, default=3, help="Train runs per setting (default 3)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "train_overhead.json"))
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.fits < 1:
        raise SystemExit("bench/train_overhead.py: error: --fits must be at least 1")
    if args.child:
        print("RESULT " + json.dumps(measure(args.fits)), flush=True)
        return

    from bench.machine import machine_info

    results: dict[str, Any] = {}
    for interval in INTERVALS:
        env = {**os.environ, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": interval}
        proc = subprocess.run([sys.executable, __file__, "--child", "--fits", str(args.fits)], env=env,
                              capture_output=True, text=True, timeout=1800)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise SystemExit(f"bench/train_overhead.py: the run at interval {interval} s failed: {tail[0]}")
        results[interval] = json.loads(line[len("RESULT "):])

    lines = ["| health-check interval (s) | fits | fit() to the function (s, median) | function to return (s, median) "
             "| fit total (s, median) | new actor, bare (s) | new actor importing torch + timm (s) |",
             "|---|---|---|---|---|---|---|"]
    for interval, r in results.items():
        med = {k: statistics.median(f[k] for f in r["fits"]) for k in ("to_function_s", "after_function_s", "total_s")}
        lines.append(f"| {interval} | {len(r['fits'])} | {med['to_function_s']:.1f} | {med['after_function_s']:.1f} | "
                     f"{med['total_s']:.1f} | {r['actor_first_answer_s']['bare']:.1f} | "
                     f"{r['actor_first_answer_s']['torch_timm']:.1f} |")
    table = "\n".join(lines)
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()
    out.write_text(json.dumps({"benchmark": "train_overhead", "command": "python bench/train_overhead.py "
                               + " ".join(sys.argv[1:] if argv is None else argv), "machine": machine_info(),
                               "load_average_after": load, "date": time.strftime("%Y-%m-%d %H:%M"),
                               "results": results, "table": table}, indent=2) + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
