"""The item index recommendation retrieves through (`serving/src/predict/items.rs`: HNSW from the
`usearch` crate) beside faiss-cpu's HNSW (PyPI), on the same vectors and queries, one query at a
time on one thread as a request searches. Both graphs are built alike (M = 32, ef_construction
200) and searched at each breadth of a sweep (ef; k + 64 is what a `nearest` step uses unless
told); per catalogue it prints each one's recall@10 against the exact answer and queries/s
(median of three passes) at each breadth, the exact scan's queries/s, and the ratio the issue
tracks: Marquee's best queries/s at recall@10 >= 0.95 over faiss's best at recall >= 0.95 (faiss
given all queries in one call, so no Python per query).

The machine's speed drifts by more than the difference measured, so the two take turns: each of
`--rounds` rounds sweeps Marquee, then faiss, and gives one ratio; the ratio reported is the
median of the rounds' (their range beside it), the table the median round's.

    .marquee/venv/bin/python bench/ann.py [--sizes 1000 20000 100000] [--dimension 32] [--queries 2000] [--rounds 5]

The vectors are clustered like movie vectors (directions around 40 genre-like centres, unit
length); a query is the unit mean of five items, as a user's history folds in. Installs
faiss-cpu into .marquee/venv when it is missing; builds the workspace as the test suite does.
"""

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np

import suite_build

ROOT = pathlib.Path(__file__).resolve().parents[1]
FAISS = "faiss-cpu==1.15.1"
K = 10
# Fine steps where the bar is crossed (a coarse grid charges each engine for the next breadth up
# from where it reaches the bar), coarser past it.
BREADTHS = [16, 24, 32, 40, 48, 56, 64, 74, 88, 100, 120, 150, 200, 250, 300, 400, 600]
RECALL_BAR = 0.95


def faiss_module():
    try:
        import faiss
    except ImportError:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", FAISS], check=True)
        import faiss
    return faiss


def clustered(n, d, rng):
    centres = rng.uniform(-1, 1, size=(40, d)).astype(np.float32)
    vectors = centres[np.arange(n) % 40] + rng.uniform(-0.4, 0.4, size=(n, d)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def marquee(vectors, queries, folder):
    index_path = folder / "index.json"
    items = [{"id": f"m{i}", "popularity": 0.0, "vector": [float(v) for v in row]}
             for i, row in enumerate(vectors)]
    index_path.write_text(json.dumps(items))
    queries_path = folder / "queries.f32"
    queries.astype("<f4").tofile(queries_path)
    binary = ROOT / "target" / "release" / "examples" / "ann_bench"
    out = subprocess.run([str(binary), str(index_path), str(queries_path), str(K)]
                         + [str(b) for b in BREADTHS],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def median_qps(search, count):
    rates = []
    for _ in range(3):
        started = time.perf_counter()
        search()
        rates.append(count / (time.perf_counter() - started))
    return sorted(rates)[1]


def faiss_hnsw(faiss, vectors):
    faiss.omp_set_num_threads(1)
    started = time.perf_counter()
    index = faiss.IndexHNSWFlat(vectors.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = 200
    index.add(vectors)
    return index, time.perf_counter() - started


def faiss_sweep(index, build, vectors, queries):
    exact = np.argsort(-(queries @ vectors.T), axis=1)[:, :K]
    sweep = []
    for breadth in BREADTHS:
        index.hnsw.efSearch = breadth
        found = index.search(queries, K)[1]
        hits = sum(len(set(f) & set(e)) for f, e in zip(found, exact))
        sweep.append({"breadth": breadth, "recall": hits / (K * len(queries)),
                      "qps": median_qps(lambda: index.search(queries, K), len(queries))})
    return {"build_seconds": build, "sweep": sweep}


def best_at_bar(sweep):
    """The highest queries/s among the breadths that reach the recall bar, or None."""
    passing = [point for point in sweep if point["recall"] >= RECALL_BAR]
    return max(passing, key=lambda point: point["qps"]) if passing else None


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 20000, 100000])
    parser.add_argument("--dimension", type=int, default=32)
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    suite_build.build()
    faiss = faiss_module()
    rng = np.random.default_rng(7)
    rows = []
    for n in args.sizes:
        vectors = clustered(n, args.dimension, rng)
        # A query is a user: the unit mean of a few items' vectors.
        picks = rng.integers(0, n, size=(args.queries, 5))
        queries = vectors[picks].mean(axis=1)
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        index, build = faiss_hnsw(faiss, vectors)
        rounds = []
        with tempfile.TemporaryDirectory() as folder:
            for _ in range(args.rounds):
                ours = marquee(vectors, queries, pathlib.Path(folder))
                theirs = faiss_sweep(index, build, vectors, queries)
                ours_best, theirs_best = best_at_bar(ours["sweep"]), best_at_bar(theirs["sweep"])
                ratio = ours_best["qps"] / theirs_best["qps"] if ours_best and theirs_best else None
                rounds.append({"marquee": ours, "faiss": theirs, "ratio": ratio})
        measured = sorted((r for r in rounds if r["ratio"] is not None), key=lambda r: r["ratio"])
        median = measured[len(measured) // 2] if measured else rounds[0]
        rows.append({"items": n, "marquee": median["marquee"], "faiss": median["faiss"],
                     "qps_ratio_at_bar": median["ratio"], "round_ratios": [r["ratio"] for r in rounds]})
    for row in rows:
        ours, theirs = row["marquee"], row["faiss"]
        print(f"\n{row['items']} items: exact scan {ours['exact_qps']:.0f} q/s; graph build "
              f"{ours['build_seconds']:.2f} s (faiss {theirs['build_seconds']:.2f} s)")
        print(f"{'breadth':>8} {'marquee q/s':>12} {'recall':>7} {'faiss q/s':>10} {'recall':>7}")
        for mine, other in zip(ours["sweep"], theirs["sweep"]):
            print(f"{mine['breadth']:>8} {mine['qps']:>12.0f} {mine['recall']:>7.3f} "
                  f"{other['qps']:>10.0f} {other['recall']:>7.3f}")
        ratio, measured = row["qps_ratio_at_bar"], [r for r in row["round_ratios"] if r is not None]
        print(f"best q/s at recall >= {RECALL_BAR}: ratio marquee/faiss "
              + (f"{ratio:.2f}, median of {len(measured)} rounds ({min(measured):.2f}-{max(measured):.2f})"
                 if ratio is not None else "n/a (a side never reaches the bar)"))
    out = ROOT / ".marquee" / "bench"
    out.mkdir(parents=True, exist_ok=True)
    (out / "ann.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
