"""Per-pair throughput of obelisk.register serially vs obelisk.dask.register_pairs on a
LocalCluster, on pairs of a dataset.json.

    python python/benchmarks/throughput.py data/corpus/dataset.json --pairs 2d_pd_smooth,... \
        --workers 2

Serial: one pair after another, each with --serial-threads threads (default: all cores).
Dask: a LocalCluster of --workers processes with one thread each, one registration per worker
at a time (threads=1). Prints seconds per pair (wall clock / pairs) for both, and checks that
the two give the same displacement.
"""

import argparse
import os
import time

import numpy as np

import obelisk
from obelisk.dask import pairs_from_dataset, register_pairs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("dataset")
    ap.add_argument("--pairs", help="comma-separated pair names (default: all)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--serial-threads", type=int, default=os.cpu_count())
    a = ap.parse_args()
    pairs = pairs_from_dataset(a.dataset)
    if a.pairs:
        want = a.pairs.split(",")
        pairs = [p for p in pairs if p["name"] in want]
        missing = set(want) - {p["name"] for p in pairs}
        if missing:
            raise SystemExit(f"no such pairs: {sorted(missing)}")
    opts = lambda p: {k: v for k, v in p.items() if k not in ("name", "fixed", "moving")}  # noqa: E731

    t = time.perf_counter()
    serial = {}
    for p in pairs:
        t1 = time.perf_counter()
        serial[p["name"]] = obelisk.register(p["fixed"], p["moving"], threads=a.serial_threads, **opts(p)).displacement
        print(f"  serial {p['name']}: {time.perf_counter() - t1:.1f} s", flush=True)
    t_serial = time.perf_counter() - t

    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=a.workers, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        with Client(cluster) as client:
            client.run(lambda: __import__("obelisk"))  # start-up of the workers is not the pairs' time
            t = time.perf_counter()
            results = register_pairs(pairs, client, with_displacement=True, threads=1)
            t_dask = time.perf_counter() - t
    worst = max(float(np.abs(r.displacement - serial[r.name]).max()) for r in results)
    n = len(pairs)
    print(f"{n} pairs; serial ({a.serial_threads} threads per pair): {t_serial:.1f} s, {t_serial / n:.2f} s/pair")
    print(f"dask LocalCluster {a.workers} workers x 1 thread: {t_dask:.1f} s, {t_dask / n:.2f} s/pair "
          f"(speed-up {t_serial / t_dask:.2f}x); largest difference from serial {worst:.2e} mm")


if __name__ == "__main__":
    main()
