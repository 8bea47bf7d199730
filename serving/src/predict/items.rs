//! Item lists for the steps that retrieve and rank: a version's item index (the items a pipeline
//! may answer with, each with a vector), searched for the items nearest a query through an
//! approximate-nearest-neighbour graph (HNSW, from `usearch`), and the final ordering with a cap
//! per field value (genre diversity). It knows items and vectors, not requests, so the search is
//! tested and benchmarked on its own.
//!
//! The graph is built when the version loads (off the async runtime), from the vectors in the
//! version's file, inserting on one thread in file order, so one file gives one graph everywhere:
//! the version's file is the artifact (readable, checksummed like every file), and the graph is a
//! cache of it that no other program needs to read. Similarities are always this module's own dot
//! products, so the graph and the exact scan score an item the same.

use std::collections::{HashMap, HashSet};

use serde_json::{Map, Value};

/// Up to this many items a search scans them all: as fast as the graph at this size and exact
/// (bench/ann.py); the graph is not built.
pub const EXACT_UP_TO: usize = 4_096;
/// How the graph is built: neighbours kept per node (M; twice that on the base layer).
const CONNECTIVITY: usize = 32;
/// How the graph is built: neighbours considered per insertion (ef_construction).
const EF_CONSTRUCTION: usize = 200;
/// How many searches the graph runs at once: a nearest step searches on tokio's blocking pool,
/// which runs up to 512 threads, so a served search never finds every context taken and falls
/// back to the exact scan (a context is a few hundred bytes until it first searches).
const SEARCH_CONTEXTS: usize = 512;

fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight running sums, so the compiler can keep them in vector registers.
    let mut sums = [0f32; 8];
    let (a_chunks, b_chunks) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = a_chunks
        .remainder()
        .iter()
        .zip(b_chunks.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in a_chunks.zip(b_chunks) {
        for lane in 0..8 {
            sums[lane] += x[lane] * y[lane];
        }
    }
    sums.iter().sum::<f32>() + tail
}

/// One item found for a query, with its cosine similarity to it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Found {
    pub position: usize,
    pub similarity: f32,
}

/// A version file's items with their vectors, ready to search.
pub struct ItemIndex {
    /// Each item's fields as answers show them (its vector left out).
    items: Vec<Map<String, Value>>,
    /// The unit vectors, row after row, in the file's order.
    vectors: Vec<f32>,
    dimension: usize,
    positions: HashMap<String, usize>,
    /// `None` up to [`EXACT_UP_TO`] items. Keys are positions.
    graph: Option<usearch::Index>,
    /// Positions by the popularity field, most popular first (ties in file order).
    popular: Vec<usize>,
    /// Each position's place in `popular`.
    popularity_rank: Vec<usize>,
}

impl std::fmt::Debug for ItemIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ItemIndex")
            .field("items", &self.items.len())
            .field("dimension", &self.dimension)
            .finish()
    }
}

impl ItemIndex {
    /// Reads a JSON list of objects, each with a unique text `key`, a numeric `popularity` and a
    /// `vector` of numbers (all of one length), and builds its graph; a search keeps the `breadth`
    /// best candidates it has seen (HNSW's ef: more is slower and finds more of the true nearest).
    pub fn parse(
        bytes: &[u8],
        key: &str,
        popularity: &str,
        breadth: usize,
    ) -> Result<Self, String> {
        let listed: Vec<Map<String, Value>> = serde_json::from_slice(bytes)
            .map_err(|e| format!("must be a JSON list of objects: {e}"))?;
        if listed.is_empty() {
            return Err("lists no items".into());
        }
        let mut items = Vec::with_capacity(listed.len());
        let mut vectors = Vec::new();
        let mut positions = HashMap::with_capacity(listed.len());
        let mut popularities = Vec::with_capacity(listed.len());
        let mut dimension = 0;
        for (at, mut item) in listed.into_iter().enumerate() {
            let id = match item.get(key) {
                Some(Value::String(id)) => id.clone(),
                _ => return Err(format!("item {at} has no text field '{key}'")),
            };
            if positions.insert(id.clone(), at).is_some() {
                return Err(format!("two items have {key} '{id}'"));
            }
            let popular = item
                .get(popularity)
                .and_then(Value::as_f64)
                .ok_or_else(|| format!("item '{id}' has no numeric field '{popularity}'"))?;
            popularities.push(popular);
            let vector: Vec<f32> = match item.remove("vector") {
                Some(Value::Array(values)) => values
                    .iter()
                    .map(|v| v.as_f64().map(|v| v as f32))
                    .collect::<Option<_>>()
                    .ok_or_else(|| format!("item '{id}': vector holds a non-number"))?,
                _ => return Err(format!("item '{id}' has no vector")),
            };
            if at == 0 {
                dimension = vector.len();
                if dimension == 0 {
                    return Err(format!("item '{id}' has an empty vector"));
                }
            } else if vector.len() != dimension {
                return Err(format!(
                    "item '{id}' has a vector of {} numbers; the first has {dimension}",
                    vector.len()
                ));
            }
            let unit = unit(&vector)
                .ok_or_else(|| format!("item '{id}' has a zero or non-finite vector"))?;
            vectors.extend_from_slice(&unit);
            items.push(item);
        }
        let graph = if items.len() > EXACT_UP_TO {
            Some(graph(&vectors, dimension, breadth.max(1))?)
        } else {
            None
        };
        let mut popular: Vec<usize> = (0..items.len()).collect();
        popular.sort_by(|&a, &b| popularities[b].total_cmp(&popularities[a]).then(a.cmp(&b)));
        let mut popularity_rank = vec![0; popular.len()];
        for (rank, &position) in popular.iter().enumerate() {
            popularity_rank[position] = rank;
        }
        Ok(Self {
            items,
            vectors,
            dimension,
            positions,
            graph,
            popular,
            popularity_rank,
        })
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub fn dimension(&self) -> usize {
        self.dimension
    }

    /// Item `position`'s fields (its vector left out).
    pub fn item(&self, position: usize) -> &Map<String, Value> {
        &self.items[position]
    }

    pub fn position(&self, key: &str) -> Option<usize> {
        self.positions.get(key).copied()
    }

    fn vector(&self, position: usize) -> &[f32] {
        &self.vectors[position * self.dimension..(position + 1) * self.dimension]
    }

    /// The query a list of items stands for (the movies a user booked): the mean of their unit
    /// vectors, made unit. `None` when no position is given, or the vectors cancel out.
    pub fn fold_in(&self, positions: &[usize]) -> Option<Vec<f32>> {
        if positions.is_empty() {
            return None;
        }
        let mut sum = vec![0f64; self.dimension];
        for &position in positions {
            for (total, &v) in sum.iter_mut().zip(self.vector(position)) {
                *total += f64::from(v);
            }
        }
        let mean: Vec<f32> = sum
            .iter()
            .map(|v| (v / positions.len() as f64) as f32)
            .collect();
        unit(&mean)
    }

    /// The `k` items most similar to `query` (a unit vector of the index's dimension), leaving
    /// out `exclude`, most similar first: from the graph, or by scanning every item where the
    /// index is small, or the graph finds fewer than asked after the exclusions, or cannot search
    /// now (more searches at once than it holds search contexts for).
    pub fn nearest(&self, query: &[f32], k: usize, exclude: &HashSet<usize>) -> Vec<Found> {
        let wanted = k.min(self.len().saturating_sub(exclude.len()));
        if let Some(graph) = &self.graph {
            let searched = if exclude.is_empty() {
                graph.search(query, k)
            } else {
                graph.filtered_search(query, k, |key| !exclude.contains(&(key as usize)))
            };
            if let Ok(matches) = searched {
                let positions: Vec<usize> = matches.keys.iter().map(|&key| key as usize).collect();
                if positions.len() >= wanted {
                    let mut found = self.score(Some(query), &positions);
                    found.sort_by(by_similarity);
                    return found;
                }
            }
        }
        self.exact(query, k, exclude)
    }

    /// How many candidates a graph search keeps (see [`Self::parse`]); for benchmarks that sweep
    /// it without rebuilding the graph.
    pub fn set_breadth(&mut self, breadth: usize) {
        if let Some(graph) = &self.graph {
            graph.change_expansion_search(breadth.max(1));
        }
    }

    /// What [`Self::nearest`] approximates: every item scored.
    pub fn exact(&self, query: &[f32], k: usize, exclude: &HashSet<usize>) -> Vec<Found> {
        let mut scored: Vec<Found> = (0..self.len())
            .filter(|position| !exclude.contains(position))
            .map(|position| Found {
                position,
                similarity: dot(query, self.vector(position)),
            })
            .collect();
        if scored.len() > k {
            scored.select_nth_unstable_by(k, by_similarity);
            scored.truncate(k);
        }
        scored.sort_by(by_similarity);
        scored
    }

    /// `positions` scored against `query` (all 0 without one), in the order given.
    pub fn score(&self, query: Option<&[f32]>, positions: &[usize]) -> Vec<Found> {
        positions
            .iter()
            .map(|&position| Found {
                position,
                similarity: query.map_or(0.0, |q| dot(q, self.vector(position))),
            })
            .collect()
    }

    /// The `k` most popular items, leaving out `exclude`, with similarity 0: what a user with
    /// no history is shown.
    pub fn popular(&self, k: usize, exclude: &HashSet<usize>) -> Vec<Found> {
        self.popular
            .iter()
            .filter(|position| !exclude.contains(position))
            .take(k)
            .map(|&position| Found {
                position,
                similarity: 0.0,
            })
            .collect()
    }

    /// `positions` most popular first.
    pub fn by_popularity(&self, positions: &mut [usize]) {
        positions.sort_by_key(|&p| self.popularity_rank[p]);
    }
}

/// Most similar first; ties in file order.
fn by_similarity(a: &Found, b: &Found) -> std::cmp::Ordering {
    b.similarity
        .total_cmp(&a.similarity)
        .then(a.position.cmp(&b.position))
}

/// The HNSW graph of `vectors` (unit, `dimension` long, keyed by position), inserted one by one
/// on one thread (one context, so its level draws are the same on every load), then given
/// [`SEARCH_CONTEXTS`] search contexts: searches past that many at once are refused and
/// [`ItemIndex::nearest`] scans instead.
fn graph(vectors: &[f32], dimension: usize, breadth: usize) -> Result<usearch::Index, String> {
    let count = vectors.len() / dimension;
    let options = usearch::IndexOptions {
        dimensions: dimension,
        metric: usearch::MetricKind::IP,
        quantization: usearch::ScalarKind::F32,
        connectivity: CONNECTIVITY,
        expansion_add: EF_CONSTRUCTION,
        expansion_search: breadth,
        multi: false,
    };
    let index = usearch::Index::new(&options).map_err(failed)?;
    index
        .reserve_capacity_and_threads(count, 1)
        .map_err(failed)?;
    for (position, vector) in vectors.chunks_exact(dimension).enumerate() {
        index.add(position as u64, vector).map_err(failed)?;
    }
    index
        .reserve_capacity_and_threads(count, SEARCH_CONTEXTS)
        .map_err(failed)?;
    Ok(index)
}

fn failed(e: impl std::fmt::Display) -> String {
    format!("cannot build the graph: {e}")
}

/// `vector` divided by its Euclidean norm; `None` for a zero or non-finite vector.
fn unit(vector: &[f32]) -> Option<Vec<f32>> {
    let norm = vector
        .iter()
        .map(|&v| f64::from(v) * f64::from(v))
        .sum::<f64>()
        .sqrt();
    (norm.is_finite() && norm > 0.0).then(|| {
        vector
            .iter()
            .map(|&v| (f64::from(v) / norm) as f32)
            .collect()
    })
}

/// A diversity rule: among the first `within` items, at most `count` of one group value while
/// items of other values remain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cap {
    pub count: usize,
    pub within: usize,
}

/// The order in which to show items scored `scores` (highest first, ties in the order given; a
/// NaN score ranks nowhere), at most `k` of them. With a `cap`, the first `cap.within` places
/// take at most `cap.count` of any one `groups` value while items of other values remain (the
/// passed-over fill what is left of those places, best first); later places go by score. An item
/// with no group value is capped by nothing.
pub fn diverse_order(
    scores: &[f32],
    groups: &[Option<&str>],
    k: usize,
    cap: Option<Cap>,
) -> Vec<usize> {
    let mut order: Vec<usize> = (0..scores.len()).filter(|&i| !scores[i].is_nan()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    let Some(cap) = cap else {
        order.truncate(k);
        return order;
    };
    let head = k.min(cap.within);
    let mut taken = Vec::with_capacity(k.min(order.len()));
    let mut passed = Vec::new();
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for &i in &order {
        if taken.len() == head {
            break;
        }
        match groups.get(i).copied().flatten() {
            Some(group) => {
                let count = counts.entry(group).or_default();
                if *count < cap.count {
                    *count += 1;
                    taken.push(i);
                } else {
                    passed.push(i);
                }
            }
            None => taken.push(i),
        }
    }
    // Too few other values: the passed-over fill the rest of the head, best first.
    let room = head.saturating_sub(taken.len());
    taken.extend(passed.into_iter().take(room));
    let placed: HashSet<usize> = taken.iter().copied().collect();
    let room = k.saturating_sub(taken.len());
    taken.extend(order.into_iter().filter(|i| !placed.contains(i)).take(room));
    taken
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small seeded generator (SplitMix64): uniform numbers in [-1, 1).
    struct Numbers(u64);

    impl Numbers {
        fn next(&mut self) -> f32 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            (z >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        }

        fn below(&mut self, n: usize) -> usize {
            (((self.next() + 1.0) / 2.0) * n as f32) as usize % n
        }
    }

    /// `n` items in `clusters` groups of nearby directions, `d` dimensions, as an index file.
    fn clustered(n: usize, d: usize, clusters: usize, seed: u64) -> Vec<u8> {
        let mut rng = Numbers(seed);
        let centres: Vec<Vec<f32>> = (0..clusters)
            .map(|_| (0..d).map(|_| rng.next()).collect())
            .collect();
        let items: Vec<Value> = (0..n)
            .map(|i| {
                let centre = &centres[i % clusters];
                let vector: Vec<f32> = centre.iter().map(|c| c + 0.4 * rng.next()).collect();
                serde_json::json!({
                    "id": format!("m{i}"),
                    "popularity": (i % 17) as f64,
                    "genre": format!("g{}", i % clusters),
                    "vector": vector,
                })
            })
            .collect();
        serde_json::to_vec(&items).unwrap()
    }

    #[test]
    fn the_graph_finds_what_an_exact_scan_finds() {
        let index = ItemIndex::parse(&clustered(6000, 32, 40, 1), "id", "popularity", 150).unwrap();
        assert!(
            index.graph.is_some(),
            "past {EXACT_UP_TO} items the graph searches"
        );
        let mut rng = Numbers(2);
        let (mut hits, mut total) = (0, 0);
        for _ in 0..200 {
            let picks: Vec<usize> = (0..5).map(|_| rng.below(index.len())).collect();
            let query = index.fold_in(&picks).unwrap();
            let exclude: HashSet<usize> = picks.iter().copied().collect();
            let truth: HashSet<usize> = index
                .exact(&query, 10, &exclude)
                .iter()
                .map(|f| f.position)
                .collect();
            let found = index.nearest(&query, 10, &exclude);
            assert_eq!(found.len(), 10);
            assert!(found.iter().all(|f| !exclude.contains(&f.position)));
            assert!(
                found
                    .windows(2)
                    .all(|w| w[0].similarity >= w[1].similarity - 1e-6)
            );
            hits += found.iter().filter(|f| truth.contains(&f.position)).count();
            total += 10;
        }
        let recall = hits as f64 / total as f64;
        assert!(recall >= 0.95, "recall@10 {recall}");
    }

    /// Queries like users: the unit mean of five items' vectors.
    fn user_queries(index: &ItemIndex, count: usize, seed: u64) -> Vec<Vec<f32>> {
        let mut rng = Numbers(seed);
        (0..count)
            .map(|_| {
                let picks: Vec<usize> = (0..5).map(|_| rng.below(index.len())).collect();
                index.fold_in(&picks).unwrap()
            })
            .collect()
    }

    #[test]
    fn one_file_gives_one_graph() {
        let file = clustered(6000, 16, 40, 4);
        let first = ItemIndex::parse(&file, "id", "popularity", 20).unwrap();
        let second = ItemIndex::parse(&file, "id", "popularity", 20).unwrap();
        let none = HashSet::new();
        for query in user_queries(&first, 200, 5) {
            assert_eq!(
                first.nearest(&query, 10, &none),
                second.nearest(&query, 10, &none)
            );
        }
    }

    #[test]
    fn many_searches_at_once_all_answer() {
        let index = ItemIndex::parse(&clustered(6000, 32, 40, 6), "id", "popularity", 150).unwrap();
        let queries = user_queries(&index, 400, 7);
        let none = HashSet::new();
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get()) * 8;
        let hits: usize = std::thread::scope(|scope| {
            let searchers: Vec<_> = (0..threads)
                .map(|t| {
                    let (index, queries, none) = (&index, &queries, &none);
                    scope.spawn(move || {
                        let mut hits = 0;
                        for query in queries.iter().skip(t).step_by(threads) {
                            let truth: HashSet<usize> = index
                                .exact(query, 10, none)
                                .iter()
                                .map(|f| f.position)
                                .collect();
                            let found = index.nearest(query, 10, none);
                            assert_eq!(found.len(), 10);
                            hits += found.iter().filter(|f| truth.contains(&f.position)).count();
                        }
                        hits
                    })
                })
                .collect();
            searchers.into_iter().map(|s| s.join().unwrap()).sum()
        });
        let recall = hits as f64 / (10 * queries.len()) as f64;
        assert!(recall >= 0.95, "recall@10 {recall}");
    }

    #[test]
    fn exclusions_past_the_graphs_breadth_fall_back_to_a_scan() {
        let index = ItemIndex::parse(&clustered(5000, 8, 3, 3), "id", "popularity", 10).unwrap();
        let query = index.fold_in(&[0]).unwrap();
        let exclude: HashSet<usize> = (0..4995).collect();
        let found = index.nearest(&query, 10, &exclude);
        let positions: HashSet<usize> = found.iter().map(|f| f.position).collect();
        assert_eq!(positions, (4995..5000).collect());
    }

    #[test]
    fn fold_in_is_the_unit_mean_and_popularity_orders_the_cold_start() {
        let file = serde_json::json!([
            {"id": "a", "popularity": 1.0, "vector": [2.0, 0.0]},
            {"id": "b", "popularity": 5.0, "vector": [0.0, 3.0]},
            {"id": "c", "popularity": 3.0, "vector": [-1.0, 0.0]}
        ]);
        let index =
            ItemIndex::parse(&serde_json::to_vec(&file).unwrap(), "id", "popularity", 8).unwrap();
        let query = index.fold_in(&[0, 1]).unwrap();
        let half = std::f32::consts::FRAC_1_SQRT_2;
        assert!((query[0] - half).abs() < 1e-6 && (query[1] - half).abs() < 1e-6);
        // Opposite vectors cancel: no direction to search in.
        assert_eq!(index.fold_in(&[0, 2]), None);
        let cold: Vec<usize> = index
            .popular(2, &HashSet::from([1]))
            .iter()
            .map(|f| f.position)
            .collect();
        assert_eq!(cold, vec![2, 0]);
        let mut given = vec![0, 2, 1];
        index.by_popularity(&mut given);
        assert_eq!(given, vec![1, 2, 0]);
        assert!(index.item(0).get("vector").is_none());
    }

    #[test]
    fn a_bad_index_file_is_named() {
        let parse = |file: Value| {
            ItemIndex::parse(&serde_json::to_vec(&file).unwrap(), "id", "popularity", 8)
                .unwrap_err()
        };
        assert!(parse(serde_json::json!([])).contains("no items"));
        assert!(
            parse(
                serde_json::json!([{"id": "a", "popularity": 1, "vector": [1, 0]},
                                     {"id": "a", "popularity": 1, "vector": [0, 1]}])
            )
            .contains("two items")
        );
        assert!(
            parse(
                serde_json::json!([{"id": "a", "popularity": 1, "vector": [1, 0]},
                                     {"id": "b", "popularity": 1, "vector": [1]}])
            )
            .contains("1 numbers")
        );
        assert!(parse(serde_json::json!([{"id": "a", "vector": [1]}])).contains("popularity"));
        assert!(
            parse(serde_json::json!([{"id": "a", "popularity": 1, "vector": [0, 0]}]))
                .contains("zero")
        );
    }

    #[test]
    fn diversity_caps_a_group_while_others_remain() {
        let scores = [0.9, 0.8, 0.7, 0.6, 0.5, f32::NAN, 0.4];
        let groups = [
            Some("a"),
            Some("a"),
            Some("a"),
            Some("b"),
            None,
            Some("b"),
            Some("a"),
        ];
        let cap = |count, within| Some(Cap { count, within });
        assert_eq!(
            diverse_order(&scores, &groups, 4, cap(2, 10)),
            vec![0, 1, 3, 4]
        );
        // Not enough of other groups: the passed-over fill the rest, best first.
        assert_eq!(
            diverse_order(&scores, &groups, 7, cap(2, 10)),
            vec![0, 1, 3, 4, 2, 6]
        );
        // The cap holds within the first places only; later places go by score.
        assert_eq!(
            diverse_order(&scores, &groups, 6, cap(1, 3)),
            vec![0, 3, 4, 1, 2, 6]
        );
        assert_eq!(diverse_order(&scores, &groups, 3, None), vec![0, 1, 2]);
    }
}
