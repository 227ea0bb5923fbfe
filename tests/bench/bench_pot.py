"""Benchmark the PoT sandbox (verify.run_pot_batch) against the naive peer (not a unit test).

    python tests/bench/bench_pot.py [--n 1000] [--peer-n 100] [--workers 2]

Programs: the first `n` PoT programs compiled by strategies.gold_pot from GSM8K train rationales
($SIKED_DATA/gsm8k/train.jsonl, default ../shared/data). Ours: a PotSandbox with `workers` worker
processes, timed cold (the pool starts inside the timed call) and warm (pool already up; the
number that matters for SIKeD's ~70,000 programs per iteration). The naive peer: a fresh
`python -c "<program>; print(answer)"` subprocess per program (sys.executable, no sandboxing at
all), run on the first `peer-n` programs only and extrapolated to programs/s, both one at a time
and with `workers` running at once. Both sides check that every answer equals the gold number.
Other jobs on a 2-core machine move every number: the load average is printed with them.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import strategies  # noqa: E402
import verify  # noqa: E402

DATA = Path(os.environ.get("SIKED_DATA", ROOT.parent / "shared" / "data"))


def gold_programs(n: int) -> tuple[list[str], list[float]]:
    programs, golds = [], []
    with open(DATA / "gsm8k" / "train.jsonl") as f:
        for line in f:
            row = json.loads(line)
            program = strategies.gold_pot(row["answer"], row["question"])
            if program is not None:
                programs.append(program)
                golds.append(float(row["answer"].split("####")[-1].replace(",", "")))
            if len(programs) == n:
                break
    return programs, golds


def naive_one(code: str) -> float | None:
    proc = subprocess.run(
        [sys.executable, "-c", code + "\nprint(answer)"], capture_output=True, text=True, timeout=10
    )
    try:
        return float(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None


def main(n: int = 1000, peer_n: int = 100, workers: int = 2) -> dict:
    programs, golds = gold_programs(n)
    load_before = os.getloadavg()[0]

    box = verify.PotSandbox(workers=workers)
    start = time.perf_counter()
    cold = box.run_batch(programs)
    cold_s = time.perf_counter() - start
    start = time.perf_counter()
    warm = box.run_batch(programs)
    warm_s = time.perf_counter() - start
    box.close()
    for results in (cold, warm):
        assert all(verify.is_correct(r.value, g) for r, g in zip(results, golds, strict=True))

    start = time.perf_counter()
    serial = [naive_one(c) for c in programs[:peer_n]]
    serial_s = time.perf_counter() - start
    start = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        parallel = list(pool.map(naive_one, programs[:peer_n]))
    parallel_s = time.perf_counter() - start
    for values in (serial, parallel):
        assert all(verify.is_correct(v, g) for v, g in zip(values, golds, strict=False))

    out = {
        "programs": len(programs),
        "workers": workers,
        "cpus": os.cpu_count(),
        "ours_cold_per_s": len(programs) / cold_s,
        "ours_warm_per_s": len(programs) / warm_s,
        "peer_programs": peer_n,
        "peer_serial_per_s": peer_n / serial_s,
        "peer_parallel_per_s": peer_n / parallel_s,
        "load_avg_before_after": (load_before, os.getloadavg()[0]),
    }
    out["speedup_warm_vs_parallel_peer"] = out["ours_warm_per_s"] / out["peer_parallel_per_s"]
    out["speedup_warm_vs_serial_peer"] = out["ours_warm_per_s"] / out["peer_serial_per_s"]
    print(
        f"run_pot_batch, {len(programs)} GSM8K gold programs, {workers} workers: "
        f"{out['ours_warm_per_s']:.0f} programs/s warm, {out['ours_cold_per_s']:.0f} cold "
        f"(pool start included)\n"
        f"naive peer (fresh `python -c` per program), measured on {peer_n} programs: "
        f"{out['peer_serial_per_s']:.1f} programs/s one at a time, "
        f"{out['peer_parallel_per_s']:.1f} with {workers} at once\n"
        f"speed-up: {out['speedup_warm_vs_parallel_peer']:.0f}x the parallel peer, "
        f"{out['speedup_warm_vs_serial_peer']:.0f}x the serial one "
        f"(load average {load_before:.1f} before, {out['load_avg_before_after'][1]:.1f} after, "
        f"{os.cpu_count()} CPUs)"
    )
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1000, help="programs for run_pot_batch")
    parser.add_argument("--peer-n", type=int, default=100, help="programs for the naive peer")
    parser.add_argument("--workers", type=int, default=2, help="sandbox workers (and peer jobs)")
    args = parser.parse_args()
    main(args.n, args.peer_n, args.workers)
