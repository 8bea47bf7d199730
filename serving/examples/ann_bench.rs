//! Times the item index a `nearest` step searches (`predict::items::ItemIndex`: usearch's HNSW
//! graph as the server builds it, and the exact scan it approximates) on an index file and a set
//! of query vectors, one query at a time as a request searches, for bench/ann.py, which runs
//! faiss-cpu's HNSW beside it on the same vectors. For each search breadth given (HNSW's ef) it
//! prints the graph's queries per second (the median of three passes) and recall@k against the
//! exact scan, as one JSON object with the build time and the exact scan's queries per second.
//!
//!     cargo run --release -p marquee-serving --example ann_bench -- index.json queries.f32 10 74 150

use std::collections::HashSet;
use std::time::Instant;

use marquee_serving::predict::items::ItemIndex;

/// The median queries per second of three passes of `search` over `queries`.
fn queries_per_second(queries: &[&[f32]], mut search: impl FnMut(&[f32])) -> f64 {
    let mut rates: Vec<f64> = (0..3)
        .map(|_| {
            let started = Instant::now();
            for query in queries {
                search(query);
            }
            queries.len() as f64 / started.elapsed().as_secs_f64()
        })
        .collect();
    rates.sort_by(f64::total_cmp);
    rates[1]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let (Some(index_path), Some(queries_path), Some(k)) = (args.get(1), args.get(2), args.get(3))
    else {
        return Err("usage: ann_bench INDEX.json QUERIES.f32 K [BREADTH...]".into());
    };
    let k: usize = k.parse()?;
    let breadths: Vec<usize> = args[4..]
        .iter()
        .map(|a| a.parse())
        .collect::<Result<_, _>>()?;
    let first = breadths.first().copied().unwrap_or(k + 64);
    let bytes = std::fs::read(index_path)?;
    let started = Instant::now();
    let mut index = ItemIndex::parse(&bytes, "id", "popularity", first)?;
    let build_seconds = started.elapsed().as_secs_f64();
    let raw = std::fs::read(queries_path)?;
    let values: Vec<f32> = raw
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let queries: Vec<&[f32]> = values.chunks(index.dimension()).collect();
    let none = HashSet::new();
    let positions = |found: Vec<marquee_serving::predict::items::Found>| -> Vec<usize> {
        found.iter().map(|f| f.position).collect()
    };

    let exact: Vec<HashSet<usize>> = queries
        .iter()
        .map(|q| positions(index.exact(q, k, &none)).into_iter().collect())
        .collect();
    let exact_qps = queries_per_second(&queries, |q| {
        std::hint::black_box(index.exact(q, k, &none));
    });
    let mut sweep = Vec::new();
    for &breadth in &breadths {
        index.set_breadth(breadth);
        let hits: usize = queries
            .iter()
            .zip(&exact)
            .map(|(q, want)| {
                let got = positions(index.nearest(q, k, &none));
                got.iter().filter(|p| want.contains(p)).count()
            })
            .sum();
        let qps = queries_per_second(&queries, |q| {
            std::hint::black_box(index.nearest(q, k, &none));
        });
        sweep.push(serde_json::json!({
            "breadth": breadth,
            "qps": qps,
            "recall": hits as f64 / (k * queries.len()).max(1) as f64,
        }));
    }
    println!(
        "{}",
        serde_json::json!({
            "items": index.len(),
            "dimension": index.dimension(),
            "queries": queries.len(),
            "build_seconds": build_seconds,
            "exact_qps": exact_qps,
            "sweep": sweep,
        })
    );
    Ok(())
}
