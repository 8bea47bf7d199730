"""The item index recommendation retrieves through (`serving/src/predict/items.rs`: HNSW from the
`instant-distance` crate) beside faiss-cpu's HNSW (PyPI), on the same vectors and queries, one
query at a time on one thread as a request searches. Prints, per catalogue, the recall@10 of each
against the exact answer and the queries per second of each (and of the exact scan), and the
ratio the issue tracks: Marquee's queries/s over faiss's (all queries in one faiss call, so no
Python per query; faiss called once per query is printed too) at recall >= 0.95.

    .marquee/venv/bin/python bench/ann.py [--sizes 1000 20000 100000] [--dimension 32] [--queries 2000]

The vectors are clustered like movie vectors (directions around 40 genre-like centres, unit
length). Both graphs use M = 32 neighbours (instant-distance's fixed M), ef_construction 200 and
the search breadth a `nearest` step uses (k + 64). Installs faiss-cpu into .marquee/venv when it
is missing; builds the workspace as the test suite does.
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
BREADTH = K + 64


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
    out = subprocess.run([str(binary), str(index_path), str(queries_path), str(K)],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def faiss_hnsw(faiss, vectors, queries):
    faiss.omp_set_num_threads(1)
    started = time.perf_counter()
    index = faiss.IndexHNSWFlat(vectors.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = 200
    index.add(vectors)
    build = time.perf_counter() - started
    index.hnsw.efSearch = BREADTH
    # All queries in one call: faiss's own loop in C++, no Python per query (the fair figure).
    started = time.perf_counter()
    found = index.search(queries, K)[1]
    seconds = time.perf_counter() - started
    # One call per query, as a Python service answering requests would make them.
    started = time.perf_counter()
    for q in queries:
        index.search(q[None, :], K)
    per_call = time.perf_counter() - started
    exact = np.argsort(-(queries @ vectors.T), axis=1)[:, :K]
    hits = sum(len(set(f) & set(e)) for f, e in zip(found, exact))
    return {"build_seconds": build, "qps": len(queries) / seconds,
            "qps_per_call": len(queries) / per_call, "recall": hits / (K * len(queries))}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 20000, 100000])
    parser.add_argument("--dimension", type=int, default=32)
    parser.add_argument("--queries", type=int, default=2000)
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
        with tempfile.TemporaryDirectory() as folder:
            ours = marquee(vectors, queries, pathlib.Path(folder))
        theirs = faiss_hnsw(faiss, vectors, queries)
        rows.append({"items": n, "marquee": ours, "faiss": theirs,
                     "qps_ratio": ours["graph_qps"] / theirs["qps"]})
    print(f"{'items':>8} {'marquee qps':>12} {'recall':>7} {'exact qps':>10} "
          f"{'faiss qps':>10} {'per call':>9} {'recall':>7} {'ratio':>6} {'build s (m/f)':>14}")
    for row in rows:
        ours, theirs = row["marquee"], row["faiss"]
        print(f"{row['items']:>8} {ours['graph_qps']:>12.0f} {ours['recall']:>7.3f} "
              f"{ours['exact_qps']:>10.0f} {theirs['qps']:>10.0f} {theirs['qps_per_call']:>9.0f} "
              f"{theirs['recall']:>7.3f} "
              f"{row['qps_ratio']:>6.2f} {ours['build_seconds']:>6.2f}/{theirs['build_seconds']:.2f}")
    out = ROOT / ".marquee" / "bench"
    out.mkdir(parents=True, exist_ok=True)
    (out / "ann.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
