//! `marquee train pricing`: dynamic ticket prices. A demand model learns the share of a show's
//! seats sold by its start (occupancy) from its price multiplier and what the show is like when a
//! price is quoted: hours to the show, weekday, hour, and, joined point in time from the
//! `show_demand` view, the movie's popularity and the last day's sales. Every show gives a row at
//! each of its demand snapshots; shows of the first 70% of the period train, the rest test.
//!
//! Serving (the pipeline, [`pipeline`]) scores a grid of candidate multipliers for the show as
//! one batch, takes the revenue-maximising one, and keeps the price within 0.7-2.0× the base
//! price and within 10% of the current price; the rule table (+20% at peak hours, +15% at
//! weekends, [`market::rule_multiplier`]) is its fallback. The evaluation reprices each test show
//! from its list price through the served pipeline until the price settles (a change is at most
//! 10%, so reaching a far price takes several quotes), counts every quote that breaks a
//! constraint, and values the settled price in the world's true demand curve
//! ([`market::expected_occupancy`]): revenue per seat, against the rule table's settled price and
//! the best price the curve allows. Pushed only if it earns more than the rule table and breaks
//! no constraint.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow_array::{ArrayRef, Float64Array, RecordBatch, StringArray, TimestampMillisecondArray};
use marquee_registry::PushFile;
use marquee_registry::manifest::GateOp;
use serde_json::{Value, json};

use super::{Candidate, Evaluator, ServedVersion, TrainOptions, Trained, column, numbers};
use crate::TrainingError;
use crate::data::features::{SNAPSHOT_HOURS, SNAPSHOTS};
use crate::data::market::{self, ShowDemand};
use marquee_registry::baseline::{ColumnBaseline, DriftBaseline};

const TRAINER: &str = include_str!("../../trainers/pricing.py");

/// The model's input columns, in order; the multiplier first (the trainer constrains it).
pub const COLUMNS: [&str; 6] = [
    "price_multiplier",
    "hours_to_show",
    "weekday",
    "hour",
    "popularity",
    "sales_24h",
];

/// The columns from the feature store, as `view:feature`.
const STORED: [&str; 2] = ["show_demand:popularity", "show_demand:sales_24h"];

/// The price band, as multiples of the base price.
pub const LOWEST_MULTIPLIER: f64 = 0.7;
pub const HIGHEST_MULTIPLIER: f64 = 2.0;
/// The largest change from the current price one quote may make.
pub const MAX_CHANGE: f64 = 0.10;
/// Candidate multipliers a quote scores.
const CANDIDATES: usize = 21;
/// Quotes the evaluation gives a policy to settle.
const ROUNDS: usize = 12;
/// How far past a bound a served price may be and still keep it: prices are shown as f32.
const TOLERANCE: f64 = 1e-6;

const HOUR_MS: i64 = 3_600_000;
const DAY_MS: i64 = 24 * HOUR_MS;

pub async fn train(options: &TrainOptions) -> Result<Trained, TrainingError> {
    let shows = Shows::read(options).await?;
    let quotes = shows.quotes();
    let set = with_stored_features(options, &shows, &quotes).await?;
    let matrix = COLUMNS
        .iter()
        .map(|name| {
            let values = numbers(column(&set, name, "the training set")?, name)?;
            Ok(values.into_iter().map(|v| v as f32).collect())
        })
        .collect::<Result<Vec<Vec<f32>>, TrainingError>>()?;

    let first = *shows.starts_ms.iter().min().unwrap_or(&0);
    let last = *shows.starts_ms.iter().max().unwrap_or(&0);
    let cutoff = first + (last - first) * 7 / 10;
    let train: Vec<usize> = (0..quotes.len())
        .filter(|&q| shows.starts_ms[quotes[q].show] < cutoff)
        .collect();
    // A test show is priced from its first quote, when its sales open.
    let test: Vec<usize> = (0..quotes.len())
        .filter(|&q| shows.starts_ms[quotes[q].show] >= cutoff && quotes[q].snapshot == SNAPSHOTS)
        .collect();
    if train.is_empty() || test.is_empty() {
        return Err(TrainingError::Data(format!(
            "the world has {} shows: too few to train and test on",
            shows.len()
        )));
    }

    let occupancy: ArrayRef = Arc::new(Float64Array::from_iter_values(
        train.iter().map(|&q| shows.occupancy[quotes[q].show]),
    ));
    let (report, model) = super::fit_table(
        options,
        "pricing",
        TRAINER,
        (&COLUMNS, &matrix, &train),
        ("occupancy", occupancy),
    )?;
    let signature = marquee_registry::onnx::signature(&model).map_err(TrainingError::Trainer)?;
    let files = vec![PushFile {
        path: "model.onnx".into(),
        contents: model.clone(),
    }];
    let manifest = |metrics: &BTreeMap<String, f64>, gates: Value, baseline: Value| {
        json!({
            "schema_version": marquee_registry::manifest::SCHEMA_VERSION,
            "name": "pricing",
            "version": 0,
            "framework": "onnx",
            "created_at": marquee_registry::now(),
            "created_by": options.by,
            "description": "Show ticket price: LightGBM demand model, revenue-maximising multiplier within 0.7-2.0x base and 10% of the current price (marquee train pricing)",
            "files": [],
            "signature": signature,
            "config": {
                "max_batch_size": 1024,
                "dynamic_batching": {"max_queue_delay_microseconds": 200},
                "instance_group": [{"count": 1, "kind": "KIND_CPU"}],
                "parameters": {"intra_op_thread_count": {"string_value": "1"}, "wait_only_for_company": {"string_value": "1"}}
            },
            "metrics": metrics,
            "gates": gates,
            "tags": {"task": "pricing", "trainer": "trainers/pricing.py"},
            "lineage": {
                "dataset_uri": options.data,
                "code_version": concat!("marquee-training-jobs ", env!("CARGO_PKG_VERSION")),
                "parameters": {
                    "seed": options.seed,
                    "split": "shows starting before 70% of the period train, the rest test",
                    "columns": COLUMNS,
                    "candidates": CANDIDATES,
                    "trainer": report,
                }
            },
            "pipeline": pipeline(),
            "drift_baseline": baseline,
        })
    };

    let candidate = Candidate::start(
        options,
        vec![ServedVersion {
            model: "pricing".into(),
            files: files.clone(),
            manifest: manifest(&BTreeMap::new(), json!([]), Value::Null),
        }],
    )
    .await?;
    let settled = settle_served(&candidate, &shows, &quotes, &set, &test).await;
    candidate.stop().await;
    let served = settled?;
    super::write_file(
        &options.work.join("pricing-first-quotes.json"),
        &serde_json::to_vec(&served.first_quotes)
            .map_err(|e| TrainingError::Output(e.to_string()))?,
    )?;

    let tested: Vec<usize> = test.iter().map(|&q| quotes[q].show).collect();
    let per_seat = |multipliers: &[f64]| -> f64 {
        tested
            .iter()
            .zip(multipliers)
            .map(|(&s, &m)| {
                shows.base_price[s] * m * market::expected_occupancy(&shows.demand[s], m)
            })
            .sum::<f64>()
            / tested.len() as f64
    };
    let rules: Vec<f64> = tested
        .iter()
        .map(|&s| {
            settle(market::rule_multiplier(
                shows.demand[s].weekday,
                shows.demand[s].hour,
            ))
        })
        .collect();
    let best: Vec<f64> = tested
        .iter()
        .map(|&s| settle(best_multiplier(&shows.demand[s])))
        .collect();
    let revenue = per_seat(&served.multipliers);
    let rules_revenue = per_seat(&rules);
    let best_revenue = per_seat(&best);
    let mut metrics = BTreeMap::from([
        ("revenue_per_seat".to_string(), revenue),
        ("rules_revenue_per_seat".to_string(), rules_revenue),
        ("best_revenue_per_seat".to_string(), best_revenue),
        (
            "revenue_lift_vs_rules".to_string(),
            revenue / rules_revenue - 1.0,
        ),
        (
            "constraint_violations".to_string(),
            served.violations as f64,
        ),
        ("quotes_checked".to_string(), served.quotes as f64),
        ("train_rows".to_string(), train.len() as f64),
        ("test_shows".to_string(), test.len() as f64),
    ]);
    if let Some(error) = report["export_max_abs_error"].as_f64() {
        metrics.insert("export_max_abs_error".into(), error);
    }
    let gates = vec![
        super::gate("revenue_per_seat", GateOp::Gt, rules_revenue),
        super::gate("constraint_violations", GateOp::Le, 0.0),
    ];
    let judged = super::judge("pricing", &gates, &metrics)?;

    let mut evaluator = Evaluator::onnx(options, &model, "X", "occupancy")?;
    let predicted = evaluator.score(&super::row_major(&matrix, &train), COLUMNS.len())?;
    let baseline = DriftBaseline {
        rows: train.len() as u64,
        inputs: COLUMNS
            .iter()
            .enumerate()
            .map(|(c, name)| {
                ColumnBaseline::numeric(
                    name,
                    &train
                        .iter()
                        .map(|&q| f64::from(matrix[c][q]))
                        .collect::<Vec<_>>(),
                )
            })
            .collect(),
        prediction: ColumnBaseline::numeric(
            "occupancy",
            &predicted.iter().map(|&v| f64::from(v)).collect::<Vec<_>>(),
        ),
    };
    let pushed = super::push(
        options,
        "pricing",
        files,
        manifest(
            &metrics,
            json!(gates),
            serde_json::to_value(&baseline).map_err(|e| TrainingError::Output(e.to_string()))?,
        ),
    )
    .await?;
    Ok(Trained {
        model: "pricing".into(),
        version: pushed.version,
        metrics,
        gates: judged,
    })
}

/// The lowest and highest price one quote may give: within the band, and within `MAX_CHANGE`
/// of the current price (the band wins where the two cannot both hold).
pub fn price_bounds(base_price: f64, current_price: f64) -> (f64, f64) {
    let band = |price: f64| {
        price.clamp(
            LOWEST_MULTIPLIER * base_price,
            HIGHEST_MULTIPLIER * base_price,
        )
    };
    (
        band((1.0 - MAX_CHANGE) * current_price),
        band((1.0 + MAX_CHANGE) * current_price),
    )
}

/// The multiplier a policy that wants `target` settles at, repricing from the list price
/// (multiplier 1), each quote within the bounds.
fn settle(target: f64) -> f64 {
    let mut current = 1.0;
    for _ in 0..ROUNDS {
        let (lowest, highest) = price_bounds(1.0, current);
        current = target.clamp(lowest, highest);
    }
    current
}

/// The multiplier the true demand curve pays best for, to a hundredth, within the band.
fn best_multiplier(demand: &ShowDemand) -> f64 {
    let steps = ((HIGHEST_MULTIPLIER - LOWEST_MULTIPLIER) * 100.0).round() as usize;
    (0..=steps)
        .map(|i| LOWEST_MULTIPLIER + i as f64 / 100.0)
        .map(|m| (m, m * market::expected_occupancy(demand, m)))
        .fold(
            (1.0, f64::MIN),
            |best, (m, r)| if r > best.1 { (m, r) } else { best },
        )
        .0
}

/// What repricing the test shows through the served pipeline came to.
struct Served {
    /// Each test show's settled multiplier.
    multipliers: Vec<f64>,
    quotes: usize,
    violations: usize,
    /// The first round's requests with the prices they got: what serving must reproduce.
    first_quotes: Vec<Value>,
}

/// Reprices every test show through `/v1/predict`, from its list price, `ROUNDS` times: each
/// quote's price becomes the next quote's current price. Every quote is checked against the
/// band and the largest change.
async fn settle_served(
    candidate: &Candidate,
    shows: &Shows,
    quotes: &[Quote],
    set: &RecordBatch,
    test: &[usize],
) -> Result<Served, TrainingError> {
    let popularity = numbers(column(set, "popularity", "the training set")?, "popularity")?;
    let sales = numbers(column(set, "sales_24h", "the training set")?, "sales_24h")?;
    let mut current: Vec<f64> = test
        .iter()
        .map(|&q| shows.base_price[quotes[q].show])
        .collect();
    let (mut checked, mut violations) = (0, 0);
    let mut first_quotes = Vec::new();
    for round in 0..ROUNDS {
        let instances: Vec<Value> = test
            .iter()
            .zip(&current)
            .map(|(&q, &price)| {
                let show = quotes[q].show;
                json!({
                    "entities": {"show_id": shows.ids[show]},
                    "features": {
                        "base_price": shows.base_price[show],
                        "current_price": price,
                        "hours_to_show": quotes[q].hours_to_show,
                        "weekday": shows.demand[show].weekday,
                        "hour": shows.demand[show].hour,
                        "popularity": popularity[q],
                        "sales_24h": sales[q],
                    }
                })
            })
            .collect();
        let answers = candidate.predict("pricing", &instances).await?;
        if round == 0 {
            first_quotes = instances
                .iter()
                .zip(&answers)
                .map(|(instance, answer)| json!({"instance": instance, "price": answer["outputs"]["price"]}))
                .collect();
        }
        for ((&q, price), answer) in test.iter().zip(current.iter_mut()).zip(&answers) {
            let quoted = answer["outputs"]["price"].as_f64().ok_or_else(|| {
                TrainingError::Evaluation(format!("a quote has no price: {answer}"))
            })?;
            let base = shows.base_price[quotes[q].show];
            checked += 1;
            if !within_constraints(base, *price, quoted) {
                violations += 1;
            }
            *price = quoted;
        }
    }
    Ok(Served {
        multipliers: test
            .iter()
            .zip(&current)
            .map(|(&q, price)| price / shows.base_price[quotes[q].show])
            .collect(),
        quotes: checked,
        violations,
        first_quotes,
    })
}

/// Whether `quoted` keeps the band and, where the band allows, the largest change from
/// `current`.
pub fn within_constraints(base_price: f64, current_price: f64, quoted: f64) -> bool {
    let slack = |bound: f64| bound.abs() * TOLERANCE;
    let (lowest, highest) = price_bounds(base_price, current_price);
    quoted >= lowest - slack(lowest) && quoted <= highest + slack(highest)
}

/// The `/v1/predict` pipeline: the show's demand features from the store (by `show_id`), the rest
/// from the request; bounds first, then the grid of candidates scored as one batch, the
/// revenue-maximising candidate, and the price within the bounds. Its fallback is the rule table
/// within the same bounds.
pub fn pipeline() -> Value {
    let bounds = |change: f64| {
        format!(
            "clamp({} * current_price, {LOWEST_MULTIPLIER} * base_price, {HIGHEST_MULTIPLIER} * base_price)",
            1.0 + change
        )
    };
    let (lowest, highest) = (bounds(-MAX_CHANGE), bounds(MAX_CHANGE));
    let rule_price =
        "base_price * if(hour >= 18 && hour < 22, 1.2, 1.0) * if(weekday >= 5, 1.15, 1.0)";
    let fallback_price = format!("clamp({rule_price}, {lowest}, {highest})");
    json!({
        "features": [
            {"name": "base_price", "required": true, "range": [0.01, 100000]},
            {"name": "current_price", "required": true, "range": [0.01, 1000000]},
            {"name": "hours_to_show", "required": true, "range": [0, 8760]},
            {"name": "weekday", "dtype": "int64", "required": true, "range": [0, 6]},
            {"name": "hour", "required": true, "range": [0, 24]},
            {"name": "popularity", "view": "show_demand"},
            {"name": "sales_24h", "view": "show_demand"}
        ],
        "steps": [
            {"op": "arithmetic", "expr": lowest, "into": "lowest"},
            {"op": "arithmetic", "expr": highest, "into": "highest"},
            {"op": "arithmetic", "expr": "lowest / base_price", "into": "lowest_multiplier"},
            {"op": "arithmetic", "expr": "highest / base_price", "into": "highest_multiplier"},
            {"op": "grid", "from": "lowest_multiplier", "to": "highest_multiplier", "count": CANDIDATES, "into": "candidates"},
            {"op": "stack", "columns": ["candidates", "hours_to_show", "weekday", "hour", "popularity", "sales_24h"], "into": "rows"},
            {"op": "model", "inputs": {"X": "rows"}, "outputs": {"occupancy": "demand"}},
            {"op": "arithmetic", "expr": "candidates * demand", "into": "revenue"},
            {"op": "argmax", "of": "revenue", "pick": "candidates", "into": "best_multiplier"},
            {"op": "argmax", "of": "revenue", "pick": "demand", "into": "expected_occupancy"},
            {"op": "arithmetic", "expr": "clamp(best_multiplier * base_price, lowest, highest)", "into": "price"},
            {"op": "arithmetic", "expr": "price / base_price", "into": "multiplier"}
        ],
        "outputs": {
            "price": "price",
            "multiplier": "multiplier",
            "expected_occupancy": "expected_occupancy",
            "lowest": "lowest",
            "highest": "highest"
        },
        "prediction": "price",
        "fallback": {"outputs": {
            "price": {"expr": fallback_price},
            "multiplier": {"expr": format!("{fallback_price} / base_price")}
        }}
    })
}

/// The world's shows: what the platform knows of each, what it sold, and (for the evaluation
/// only) the demand it met.
struct Shows {
    ids: Vec<String>,
    starts_ms: Vec<i64>,
    base_price: Vec<f64>,
    multiplier: Vec<f64>,
    /// Share of seats sold by the start.
    occupancy: Vec<f64>,
    demand: Vec<ShowDemand>,
}

/// A price quote of a show at one of its demand snapshots.
struct Quote {
    show: usize,
    /// Counting back from the show: `SNAPSHOTS` is the first, `SNAPSHOT_HOURS` × it before.
    snapshot: i64,
    quoted_ms: i64,
    hours_to_show: f64,
}

impl Shows {
    async fn read(options: &TrainOptions) -> Result<Self, TrainingError> {
        let table = "shows.parquet";
        let shows = super::read_table(&options.data, table).await?;
        let ids = super::text_column(&shows, "show_id", table)?;
        let starts_ms = super::times_ms(column(&shows, "starts_at", table)?, "starts_at")?;
        let base_price = numbers(column(&shows, "base_price", table)?, "base_price")?;
        let multiplier = numbers(
            column(&shows, "price_multiplier", table)?,
            "price_multiplier",
        )?;
        let capacity = numbers(column(&shows, "capacity", table)?, "capacity")?;
        let sold = numbers(column(&shows, "seats_sold", table)?, "seats_sold")?;
        if let Some(at) = capacity.iter().position(|&c| c < 1.0) {
            return Err(TrainingError::Data(format!(
                "{table}: show {} has no seats",
                ids[at]
            )));
        }
        let occupancy = sold.iter().zip(&capacity).map(|(s, c)| s / c).collect();

        let table = "labels/show_demand_truth.parquet";
        let truth = super::read_table(&options.data, table).await?;
        let truth_ids = super::text_column(&truth, "show_id", table)?;
        let popularity = numbers(column(&truth, "popularity", table)?, "popularity")?;
        if truth_ids != ids {
            return Err(TrainingError::Data(format!(
                "{table} does not list the shows of shows.parquet in order"
            )));
        }
        let demand = starts_ms
            .iter()
            .zip(popularity)
            .map(|(&starts, popularity)| ShowDemand {
                popularity,
                weekday: weekday(starts),
                hour: starts.rem_euclid(DAY_MS) as f64 / HOUR_MS as f64,
            })
            .collect();
        Ok(Self {
            ids,
            starts_ms,
            base_price,
            multiplier,
            occupancy,
            demand,
        })
    }

    fn len(&self) -> usize {
        self.ids.len()
    }

    /// A quote a minute after each of every show's demand snapshots (once the pipeline wrote
    /// it), first snapshot first.
    fn quotes(&self) -> Vec<Quote> {
        let mut quotes = Vec::with_capacity(self.len() * SNAPSHOTS as usize);
        for (show, &starts) in self.starts_ms.iter().enumerate() {
            for snapshot in (1..=SNAPSHOTS).rev() {
                let quoted_ms = starts - snapshot * SNAPSHOT_HOURS * HOUR_MS + 60_000;
                quotes.push(Quote {
                    show,
                    snapshot,
                    quoted_ms,
                    hours_to_show: (starts - quoted_ms) as f64 / HOUR_MS as f64,
                });
            }
        }
        quotes
    }
}

/// 0 = Monday (1970-01-01, day 0, was a Thursday).
fn weekday(ms: i64) -> u32 {
    (ms.div_euclid(DAY_MS) + 3).rem_euclid(7) as u32
}

/// The quotes with the show's demand features as of each (the point-in-time join).
async fn with_stored_features(
    options: &TrainOptions,
    shows: &Shows,
    quotes: &[Quote],
) -> Result<RecordBatch, TrainingError> {
    let each = |f: &dyn Fn(&Quote) -> f64| -> ArrayRef {
        Arc::new(Float64Array::from_iter_values(quotes.iter().map(f)))
    };
    let entities = RecordBatch::try_from_iter([
        (
            "show_id",
            Arc::new(StringArray::from_iter_values(
                quotes.iter().map(|q| shows.ids[q.show].as_str()),
            )) as ArrayRef,
        ),
        (
            "quoted_at",
            Arc::new(TimestampMillisecondArray::from_iter_values(
                quotes.iter().map(|q| q.quoted_ms),
            )),
        ),
        ("price_multiplier", each(&|q| shows.multiplier[q.show])),
        ("hours_to_show", each(&|q| q.hours_to_show)),
        (
            "weekday",
            each(&|q| f64::from(shows.demand[q.show].weekday)),
        ),
        ("hour", each(&|q| shows.demand[q.show].hour)),
    ])
    .map_err(|e| TrainingError::Data(e.to_string()))?;
    super::point_in_time(options, &entities, "quoted_at", &STORED).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_generated_day_is_a_monday() {
        assert_eq!(weekday(crate::data::START_MS), 0);
        assert_eq!(weekday(crate::data::START_MS + 5 * DAY_MS + HOUR_MS), 5);
    }

    #[test]
    fn bounds_keep_the_band_and_the_largest_change() {
        let (lowest, highest) = price_bounds(10.0, 10.0);
        assert!((lowest - 9.0).abs() < 1e-9 && (highest - 11.0).abs() < 1e-9);
        // Far above the band: the band's top, however far that is from the current price.
        assert_eq!(price_bounds(10.0, 40.0), (20.0, 20.0));
        assert_eq!(price_bounds(10.0, 1.0), (7.0, 7.0));
        assert!(within_constraints(10.0, 10.0, 11.0));
        assert!(!within_constraints(10.0, 10.0, 11.01));
    }

    #[test]
    fn settling_reaches_a_far_price_in_steps() {
        let settled = settle(1.6);
        assert!((settled - 1.6).abs() < 1e-9, "{settled}");
        assert_eq!(settle(5.0), HIGHEST_MULTIPLIER);
    }

    #[test]
    fn the_pipeline_fallback_is_the_rule_table() {
        let declared = pipeline();
        let text = declared["fallback"]["outputs"]["price"]["expr"]
            .as_str()
            .unwrap();
        let expression = marquee_serving::predict::expression::Expression::parse(text).unwrap();
        for (weekday, hour) in [(0u32, 11.0), (2, 19.5), (5, 14.0), (6, 19.5), (6, 22.0)] {
            let values: Vec<f64> = expression
                .names()
                .iter()
                .map(|name| match name.as_str() {
                    "base_price" | "current_price" => 10.0,
                    "hour" => hour,
                    "weekday" => f64::from(weekday),
                    other => panic!("{other}"),
                })
                .collect();
            let (lowest, highest) = price_bounds(10.0, 10.0);
            let expected = (10.0 * market::rule_multiplier(weekday, hour)).clamp(lowest, highest);
            let price = expression.eval(&values).unwrap();
            assert!((price - expected).abs() < 1e-9, "{weekday} {hour}: {price}");
        }
    }
}
