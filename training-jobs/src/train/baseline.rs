//! The drift baseline a training job stores in the manifest: for each model input and for the
//! prediction, a histogram of the training data over its deciles. The drift monitor compares live
//! windows against it (PSI over the same bins, a KS distance over their cumulative shares), so the
//! bins must come from the training data, not from whatever traffic arrives first.

use serde::Serialize;

/// A histogram: `edges` are the interior bin edges (at most nine, ascending, distinct); bin `i`
/// holds values in (`edges[i-1]`, `edges[i]`], the first everything at or below `edges[0]`, the
/// last everything above the last edge.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Histogram {
    pub edges: Vec<f64>,
    pub counts: Vec<u64>,
}

impl Histogram {
    /// Decile bins of `values` (fewer when values repeat: a 0/1 feature gets two bins).
    pub fn of(values: &[f64]) -> Self {
        let mut sorted: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
        sorted.sort_by(f64::total_cmp);
        let mut edges: Vec<f64> = Vec::new();
        if !sorted.is_empty() {
            for decile in 1..10 {
                let edge = sorted[(sorted.len() - 1) * decile / 10];
                if edges.last() != Some(&edge) {
                    edges.push(edge);
                }
            }
            // An edge at the maximum would leave the last bin empty by construction.
            if edges.last() == sorted.last() {
                edges.pop();
            }
        }
        let mut counts = vec![0u64; edges.len() + 1];
        for &value in &sorted {
            counts[edges.partition_point(|&e| e < value)] += 1;
        }
        Self { edges, counts }
    }
}

/// The manifest's `drift_baseline`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DriftBaseline {
    pub rows: usize,
    /// In the model's input order.
    pub inputs: Vec<InputHistogram>,
    pub prediction: Histogram,
}

/// One input's histogram, named: `{"name": ..., "edges": [...], "counts": [...]}`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct InputHistogram {
    pub name: String,
    #[serde(flatten)]
    pub histogram: Histogram,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deciles_split_a_uniform_sample_evenly() {
        let values: Vec<f64> = (0..1000).map(f64::from).collect();
        let histogram = Histogram::of(&values);
        assert_eq!(histogram.edges.len(), 9);
        assert_eq!(histogram.counts.iter().sum::<u64>(), 1000);
        assert!(
            histogram.counts.iter().all(|&c| (99..=101).contains(&c)),
            "{histogram:?}"
        );
    }

    #[test]
    fn repeated_values_get_fewer_bins() {
        let mut values = vec![0.0; 90];
        values.extend([1.0; 10]);
        let histogram = Histogram::of(&values);
        assert_eq!(histogram.edges, [0.0]);
        assert_eq!(histogram.counts, [90, 10]);
        assert_eq!(Histogram::of(&[5.0; 4]).counts, [4]);
        assert_eq!(Histogram::of(&[]).counts, [0]);
    }
}
