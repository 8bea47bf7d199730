//! Times the item index a `nearest` step searches (`predict::items::ItemIndex`: the HNSW graph of
//! `instant-distance`, and the exact scan it approximates) on an index file and a set of query
//! vectors, one query at a time as a request searches, for bench/ann.py, which runs faiss-cpu's
//! HNSW beside it on the same vectors. Prints one JSON object: build time, queries per second of
//! the graph and of the exact scan, and the graph's recall@k against the exact scan.
//!
//!     cargo run --release -p marquee-serving --example ann_bench -- index.json queries.f32 10

use std::collections::HashSet;
use std::time::Instant;

use marquee_serving::predict::items::ItemIndex;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let (Some(index_path), Some(queries_path)) = (args.get(1), args.get(2)) else {
        return Err("usage: ann_bench INDEX.json QUERIES.f32 [K]".into());
    };
    let k: usize = args.get(3).map_or(Ok(10), |a| a.parse())?;
    let bytes = std::fs::read(index_path)?;
    let started = Instant::now();
    let index = ItemIndex::parse(&bytes, "id", "popularity", k + 64)?;
    let build_seconds = started.elapsed().as_secs_f64();
    let raw = std::fs::read(queries_path)?;
    let values: Vec<f32> = raw
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let queries: Vec<&[f32]> = values.chunks(index.dimension()).collect();
    let none = HashSet::new();

    let started = Instant::now();
    let found: Vec<Vec<usize>> = queries
        .iter()
        .map(|q| {
            index
                .nearest(q, k, &none)
                .iter()
                .map(|f| f.position)
                .collect()
        })
        .collect();
    let graph_seconds = started.elapsed().as_secs_f64();
    let started = Instant::now();
    let exact: Vec<Vec<usize>> = queries
        .iter()
        .map(|q| {
            index
                .exact(q, k, &none)
                .iter()
                .map(|f| f.position)
                .collect()
        })
        .collect();
    let exact_seconds = started.elapsed().as_secs_f64();
    let hits: usize = found
        .iter()
        .zip(&exact)
        .map(|(got, want)| {
            let want: HashSet<&usize> = want.iter().collect();
            got.iter().filter(|p| want.contains(p)).count()
        })
        .sum();
    println!(
        "{}",
        serde_json::json!({
            "items": index.len(),
            "dimension": index.dimension(),
            "queries": queries.len(),
            "build_seconds": build_seconds,
            "graph_qps": queries.len() as f64 / graph_seconds,
            "exact_qps": queries.len() as f64 / exact_seconds,
            "recall": hits as f64 / (k * queries.len()).max(1) as f64,
        })
    );
    Ok(())
}
