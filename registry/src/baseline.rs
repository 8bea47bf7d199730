//! The drift baseline a version's manifest carries (`drift_baseline`): for each model input and
//! for the prediction, what the training data looked like, in the form the drift monitor's tests
//! need. Training jobs write it (`marquee train`); serving reads it (`serving/src/drift.rs`). A
//! column keeps its reference rows' values (all of them up to 1000, else 1000 evenly spaced
//! quantiles, enough for a distance within a fraction of a percent), their spread, their counts
//! when there are few distinct values, and decile bins for the population stability index. It is
//! small whatever the training set's size, and it lives here because both sides must agree on it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Reference values a column keeps at most; a larger reference keeps this many quantiles.
pub const KEPT_VALUES: usize = 1000;

/// Distinct values a column counts; past this, a string column is text and a numeric one has
/// no `categories`.
pub const KEPT_CATEGORIES: usize = 64;

/// The manifest's `drift_baseline`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DriftBaseline {
    /// Rows of the training data it was taken from.
    pub rows: u64,
    /// In the model's input order.
    pub inputs: Vec<ColumnBaseline>,
    /// The model's output over the training rows. Named `prediction` when it is what
    /// `/v1/predict` answers as its main value (and so judged against it); named for what it is
    /// otherwise (pricing's `occupancy`, under a price answer), and then not judged.
    pub prediction: ColumnBaseline,
}

impl DriftBaseline {
    /// Reads a manifest's `drift_baseline`; `None` when it has none, or one written before the
    /// baseline kept values (histograms alone cannot be tested the way the monitor tests).
    pub fn from_manifest(value: &serde_json::Value) -> Option<Self> {
        let baseline: Self = serde_json::from_value(value.clone()).ok()?;
        let usable = |c: &ColumnBaseline| !c.values.is_empty() || !c.categories.is_empty();
        (baseline.inputs.iter().any(usable) || usable(&baseline.prediction)).then_some(baseline)
    }
}

/// One column's reference.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ColumnBaseline {
    pub name: String,
    /// Reference rows with a value in this column.
    #[serde(default)]
    pub rows: u64,
    /// Sorted numeric values: every one up to [`KEPT_VALUES`], else that many quantiles. Empty
    /// for a string column.
    #[serde(default)]
    pub values: Vec<f64>,
    /// Population standard deviation of all the numeric values.
    #[serde(default)]
    pub std: f64,
    /// Rows per distinct value (numbers named by [`number_key`]), when there are at most
    /// [`KEPT_CATEGORIES`]; empty otherwise.
    #[serde(default)]
    pub categories: BTreeMap<String, u64>,
    /// Interior decile edges, ascending: bin `i` holds values in (`edges[i-1]`, `edges[i]`].
    #[serde(default)]
    pub edges: Vec<f64>,
    #[serde(default)]
    pub counts: Vec<u64>,
}

/// How a number is named as a category: at f32 precision, the models' own (so a value the
/// training data held as f32 and the same value served as f64 get one name; `1` and `1.0` too).
pub fn number_key(value: f64) -> String {
    (value as f32).to_string()
}

impl ColumnBaseline {
    /// The reference of a numeric column (NaNs left out).
    pub fn numeric(name: &str, values: &[f64]) -> Self {
        let mut sorted: Vec<f64> = values.iter().copied().filter(|v| !v.is_nan()).collect();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let mean = sorted.iter().sum::<f64>() / n.max(1) as f64;
        let std = (sorted.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n.max(1) as f64).sqrt();
        // Midpoint quantiles: each kept value stands for 1/KEPT_VALUES of the rows, so the
        // extremes weigh what they weigh in the data (a heavy tail's maximum would not).
        let kept = if n <= KEPT_VALUES {
            sorted.clone()
        } else {
            (0..KEPT_VALUES)
                .map(|k| sorted[((2 * k + 1) * n / (2 * KEPT_VALUES)).min(n - 1)])
                .collect()
        };
        let mut categories = BTreeMap::new();
        for &value in &sorted {
            *categories.entry(number_key(value)).or_insert(0) += 1;
            if categories.len() > KEPT_CATEGORIES {
                categories.clear();
                break;
            }
        }
        let (edges, counts) = deciles(&sorted);
        Self {
            name: name.to_string(),
            rows: n as u64,
            values: kept,
            std,
            categories,
            edges,
            counts,
        }
    }

    /// The reference of a string column: its counts (none past [`KEPT_CATEGORIES`]: text).
    pub fn categorical<'a>(name: &str, values: impl IntoIterator<Item = &'a str>) -> Self {
        let mut categories = BTreeMap::new();
        let mut rows = 0;
        for value in values {
            rows += 1;
            *categories.entry(value.to_string()).or_insert(0) += 1;
        }
        if categories.len() > KEPT_CATEGORIES {
            categories.clear();
        }
        Self {
            name: name.to_string(),
            rows,
            values: Vec::new(),
            std: 0.0,
            categories,
            edges: Vec::new(),
            counts: Vec::new(),
        }
    }
}

/// Decile bins of sorted values (fewer when values repeat: a 0/1 column gets two bins).
fn deciles(sorted: &[f64]) -> (Vec<f64>, Vec<u64>) {
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
    for &value in sorted {
        counts[bin(&edges, value)] += 1;
    }
    (edges, counts)
}

/// The decile bin of a value.
pub fn bin(edges: &[f64], value: f64) -> usize {
    edges.partition_point(|&e| e < value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_small_reference_keeps_every_value_and_a_large_one_its_quantiles() {
        let small: Vec<f64> = (0..500).map(f64::from).rev().collect();
        let column = ColumnBaseline::numeric("x", &small);
        assert_eq!(column.rows, 500);
        assert_eq!(column.values, (0..500).map(f64::from).collect::<Vec<_>>());
        assert!(
            column.categories.is_empty(),
            "500 distinct values are not categories"
        );
        assert_eq!(column.counts.iter().sum::<u64>(), 500);
        assert!(
            column.counts.iter().all(|&c| (49..=51).contains(&c)),
            "{column:?}"
        );

        let large: Vec<f64> = (0..100_000).map(|i| f64::from(i) / 100.0).collect();
        let column = ColumnBaseline::numeric("x", &large);
        assert_eq!((column.rows, column.values.len()), (100_000, KEPT_VALUES));
        // Midpoints of 1000 equal shares of 0.00 ..= 999.99.
        assert_eq!(column.values[0], 0.5);
        assert_eq!(*column.values.last().unwrap(), 999.5);
        // Population standard deviation of a uniform grid: range / sqrt(12).
        assert!(
            (column.std - 1000.0 / 12f64.sqrt()).abs() < 0.1,
            "{}",
            column.std
        );
    }

    #[test]
    fn few_distinct_values_are_counted_and_text_is_not() {
        let mut flags = vec![0.0; 90];
        flags.extend([1.0; 10]);
        let column = ColumnBaseline::numeric("flag", &flags);
        assert_eq!(
            column.categories,
            BTreeMap::from([("0".into(), 90), ("1".into(), 10)])
        );
        assert_eq!(number_key(0.1), number_key(f64::from(0.1f32)));
        assert_eq!(
            (column.edges.as_slice(), column.counts.as_slice()),
            (&[0.0][..], &[90, 10][..])
        );
        let devices = ColumnBaseline::categorical("device", ["ios", "web", "ios"]);
        assert_eq!(devices.categories["ios"], 2);
        let text: Vec<String> = (0..100).map(|i| format!("review {i}")).collect();
        let column = ColumnBaseline::categorical("review", text.iter().map(String::as_str));
        assert_eq!(column.rows, 100);
        assert!(column.categories.is_empty());
    }

    #[test]
    fn old_histogram_only_baselines_are_not_usable() {
        let old = serde_json::json!({"rows": 10, "inputs": [{"name": "x", "edges": [1.0], "counts": [5, 5]}],
                                     "prediction": {"edges": [], "counts": [10]}});
        assert!(DriftBaseline::from_manifest(&old).is_none());
        let new = DriftBaseline {
            rows: 3,
            inputs: vec![ColumnBaseline::numeric("x", &[1.0, 2.0, 3.0])],
            prediction: ColumnBaseline::numeric("prediction", &[0.5, 0.5, 0.7]),
        };
        let value = serde_json::to_value(&new).unwrap();
        assert_eq!(DriftBaseline::from_manifest(&value), Some(new));
    }
}
