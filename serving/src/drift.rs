//! The drift monitor: per model version, are the inputs and predictions `/v1/predict` sees now
//! distributed like the data the version was trained on? Each version collects windows of rows
//! (closed at `--drift-window-rows`, or after `--drift-window-seconds` with enough rows), and
//! each closed window is judged column by column against the version's baseline: the manifest's
//! (`marquee_registry::baseline`, written by the training job) or, for a version pushed without
//! one, its first `--drift-reference-rows` rows, flagged as such.
//!
//! Tests are chosen per column as Evidently does by default: a reference of at most 1000 rows
//! gets Kolmogorov–Smirnov for numeric columns with more than 5 distinct values, chi-square for
//! other columns with more than 2 and a two-proportion Z-test for the rest (drift: p < 0.05); a
//! larger reference gets the normed Wasserstein distance for such numeric columns and
//! Jensen–Shannon for the others (drift: distance ≥ 0.1). PSI over the baseline's deciles is
//! reported beside, for dashboards. The dataset drifts when the share of drifting columns
//! reaches `--drift-share`.
//!
//! State is fixed in size per version (the window's values, at most the window's rows per
//! column; at most 64 counted categories), so memory does not grow with traffic. Recording a
//! row is the only work on the request path; judging runs on a blocking thread. A window that
//! drifts is a `drift.detected` event, and may start the model's `--drift-command`.

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use marquee_events::{EventLog, Record, now_ms, rfc3339};
use marquee_feature_store::FeatureValue;
use marquee_registry::baseline::{ColumnBaseline, DriftBaseline, KEPT_CATEGORIES, bin, number_key};
use prometheus::{GaugeVec, IntCounterVec, Opts, Registry};
use serde::Serialize;
use serde_json::{Map, Value};

use crate::stats;

/// Reference rows up to which the p-value tests are used (Evidently's default).
pub const SMALL_REFERENCE: u64 = 1000;
/// Distinct values up to which a numeric column is tested as categories.
pub const FEW_VALUES: usize = 5;
/// p-value under which a column drifts (KS, chi-square, Z).
pub const P_THRESHOLD: f64 = 0.05;
/// Distance from which a column drifts (Wasserstein normed, Jensen–Shannon).
pub const DISTANCE_THRESHOLD: f64 = 0.1;
/// The name the prediction is judged under.
pub const PREDICTION: &str = "prediction";
/// Windows of a version kept for `GET /v1/models/{name}/drift`.
const KEPT_REPORTS: usize = 10;
/// Closed windows of a version that may wait while one is judged; past it the oldest waiting
/// one is dropped (and counted), so judging never falls behind without bound.
const WAITING_WINDOWS: usize = 1;
/// Longest a drift command may run before it is killed.
const COMMAND_LIMIT: Duration = Duration::from_secs(3600);

/// `marquee serve`'s drift settings.
#[derive(Debug, Clone, PartialEq)]
pub struct DriftConfig {
    /// Rows a window closes at; 0 turns the monitor off.
    pub window_rows: usize,
    /// Longest a window stays open once it has `min_window_rows`.
    pub window_seconds: f64,
    pub min_window_rows: usize,
    /// Rows that become the baseline of a version whose manifest has none.
    pub reference_rows: usize,
    /// Share of drifting columns from which the dataset drifts.
    pub drift_share: f64,
    /// Per model, a shell command started when a window drifts (after one that did not).
    pub commands: BTreeMap<String, String>,
}

/// A test the monitor chose for a column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DriftTest {
    Ks,
    ChiSquare,
    ZTest,
    Wasserstein,
    JensenShannon,
}

/// Where a version's baseline came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BaselineSource {
    /// The training data, from the manifest.
    Manifest,
    /// The version's first requests (its manifest has none): flagged, as traffic that was
    /// already drifting would make a baseline that hides it.
    FirstRequests,
}

/// One column of one window, judged.
#[derive(Debug, Clone, Serialize)]
pub struct ColumnDrift {
    pub column: String,
    pub test: Option<DriftTest>,
    /// The KS statistic, chi-square statistic or z; the distance for distances.
    pub statistic: Option<f64>,
    pub p_value: Option<f64>,
    pub threshold: f64,
    pub drifted: bool,
    /// Population stability index over the baseline's bins.
    pub psi: Option<f64>,
    pub reference_rows: u64,
    pub current_rows: usize,
    /// Why it was not judged.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skipped: Option<String>,
}

/// One closed window of a version, judged.
#[derive(Debug, Clone, Serialize)]
pub struct DriftReport {
    pub model: String,
    pub version: u64,
    pub baseline: BaselineSource,
    pub window_rows: usize,
    pub window_started: String,
    pub window_closed: String,
    pub columns: Vec<ColumnDrift>,
    pub judged_columns: usize,
    pub drifted_columns: Vec<String>,
    pub share_drifted: f64,
    pub drift_share: f64,
    pub dataset_drift: bool,
}

/// One value of one column of one row.
enum Cell<'a> {
    Number(f64),
    Category(&'a str),
}

/// A window's values of one column: numbers as they came, and counts per distinct value while
/// there are at most [`KEPT_CATEGORIES`].
#[derive(Default)]
struct ColumnWindow {
    numbers: Vec<f64>,
    categories: BTreeMap<String, u64>,
    /// Numbers per distinct f32 value.
    number_counts: BTreeMap<u32, u64>,
    /// More distinct values than are counted.
    overflowed: bool,
    rows: usize,
}

impl ColumnWindow {
    /// One value; numbers are counted by their bits at f32 precision (no text per row).
    fn push(&mut self, cell: Cell<'_>) {
        self.rows += 1;
        if self.overflowed {
            if let Cell::Number(value) = cell {
                self.numbers.push(value);
            }
            return;
        }
        let distinct = self.categories.len() + self.number_counts.len();
        match cell {
            Cell::Number(value) => {
                self.numbers.push(value);
                let bits = (value as f32).to_bits();
                match self.number_counts.get_mut(&bits) {
                    Some(count) => *count += 1,
                    None if distinct < KEPT_CATEGORIES => {
                        self.number_counts.insert(bits, 1);
                    }
                    None => self.overflow(),
                }
            }
            Cell::Category(value) => match self.categories.get_mut(value) {
                Some(count) => *count += 1,
                None if distinct < KEPT_CATEGORIES => {
                    self.categories.insert(value.to_string(), 1);
                }
                None => self.overflow(),
            },
        }
    }

    fn overflow(&mut self) {
        self.overflowed = true;
        self.categories.clear();
        self.number_counts.clear();
    }

    /// Rows per distinct value, named as the baseline names them; empty once overflowed.
    fn counts(&self) -> BTreeMap<String, u64> {
        let numbers = self
            .number_counts
            .iter()
            .map(|(&bits, &n)| (number_key(f64::from(f32::from_bits(bits))), n));
        let mut counts: BTreeMap<String, u64> = self.categories.clone();
        for (key, n) in numbers {
            *counts.entry(key).or_insert(0) += n;
        }
        counts
    }

    /// This window's values as a baseline (for a version without one).
    fn baseline(&self, name: &str) -> ColumnBaseline {
        if self.numbers.is_empty() && self.rows > 0 {
            let mut column = ColumnBaseline::categorical(name, std::iter::empty());
            column.rows = self.rows as u64;
            column.categories = self.counts();
            column
        } else {
            ColumnBaseline::numeric(name, &self.numbers)
        }
    }
}

/// The columns of a version's rows: its pipeline's features, then the prediction.
struct Window {
    started: Instant,
    started_ms: i64,
    columns: Vec<ColumnWindow>,
    rows: usize,
}

impl Window {
    fn new(columns: usize) -> Self {
        Self {
            started: Instant::now(),
            started_ms: now_ms(),
            columns: (0..columns).map(|_| ColumnWindow::default()).collect(),
            rows: 0,
        }
    }
}

/// A version's baseline, once it has one.
struct Baseline {
    source: BaselineSource,
    /// By column name.
    columns: HashMap<String, ColumnBaseline>,
}

/// One version's monitor.
struct VersionDrift {
    names: Vec<String>,
    baseline: Option<Arc<Baseline>>,
    window: Window,
    reports: Vec<Arc<DriftReport>>,
    windows_judged: u64,
    windows_drifted: u64,
    /// Whether the last judged window drifted (a command starts on the change only).
    drifting: bool,
    /// Closed windows waiting to be judged, oldest first (at most [`WAITING_WINDOWS`]).
    pending: std::collections::VecDeque<(Window, Arc<Baseline>)>,
    /// Whether a thread is judging this version's windows (one at a time, in order).
    judging: bool,
    /// Windows dropped unjudged: they closed faster than they could be judged.
    windows_skipped: u64,
}

/// A version's monitor, shared by the requests that record rows and the judging thread.
type SharedVersion = Arc<Mutex<VersionDrift>>;

/// One row as `/v1/predict` answered it.
pub struct ObservedRow<'a> {
    /// The values the model saw, in pipeline feature order.
    pub inputs: &'a [FeatureValue],
    pub prediction: Option<&'a Value>,
    pub label: Option<&'a str>,
}

/// The monitor of every model version `/v1/predict` answers with.
pub struct DriftMonitor {
    config: DriftConfig,
    /// `window_seconds`, checked.
    window_time: Duration,
    /// Per model, per version.
    versions: RwLock<HashMap<String, BTreeMap<u64, SharedVersion>>>,
    events: Option<EventLog>,
    metrics: Option<DriftMetrics>,
    /// Models whose command is running.
    running: Mutex<BTreeSet<String>>,
    /// Whether a version is still served (set by the server): a request still running on a
    /// version retired meanwhile must not bring its state back after `forget`.
    serving: std::sync::OnceLock<VersionServed>,
}

/// Whether `model` serves `version` now.
pub type VersionServed = Box<dyn Fn(&str, u64) -> bool + Send + Sync>;

struct DriftMetrics {
    windows: IntCounterVec,
    share: GaugeVec,
    column_drifted: GaugeVec,
    column_psi: GaugeVec,
    commands: IntCounterVec,
}

impl DriftMetrics {
    fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let labels = ["model", "version"];
        let column = ["model", "version", "column"];
        let windows = IntCounterVec::new(
            Opts::new(
                "marquee_drift_windows_total",
                "Windows the drift monitor judged, by result (drift, no_drift)",
            ),
            &["model", "version", "result"],
        )?;
        let share = GaugeVec::new(
            Opts::new(
                "marquee_drift_share",
                "Share of columns that drifted in the version's last judged window",
            ),
            &labels,
        )?;
        let column_drifted = GaugeVec::new(
            Opts::new(
                "marquee_drift_column_drifted",
                "1 when the column drifted in the version's last judged window",
            ),
            &column,
        )?;
        let column_psi = GaugeVec::new(
            Opts::new(
                "marquee_drift_column_psi",
                "Population stability index of the column in the version's last judged window",
            ),
            &column,
        )?;
        let commands = IntCounterVec::new(
            Opts::new(
                "marquee_drift_commands_total",
                "Drift commands started, by how they ended (succeeded, failed, skipped: one was running)",
            ),
            &["model", "outcome"],
        )?;
        registry.register(Box::new(windows.clone()))?;
        registry.register(Box::new(share.clone()))?;
        registry.register(Box::new(column_drifted.clone()))?;
        registry.register(Box::new(column_psi.clone()))?;
        registry.register(Box::new(commands.clone()))?;
        Ok(Self {
            windows,
            share,
            column_drifted,
            column_psi,
            commands,
        })
    }
}

/// What `GET /v1/models/{name}/drift` shows of one version.
#[derive(Debug, Serialize)]
pub struct VersionDriftView {
    pub version: u64,
    /// `null` while a version without a manifest baseline collects its first rows.
    pub baseline: Option<BaselineSource>,
    pub baseline_rows_collected: usize,
    pub current_window_rows: usize,
    pub windows_judged: u64,
    pub windows_drifted: u64,
    /// The last judged windows, newest first.
    pub reports: Vec<DriftReport>,
}

impl DriftMonitor {
    pub fn new(
        config: DriftConfig,
        events: Option<EventLog>,
        registry: Option<&Registry>,
    ) -> Result<Self, String> {
        let window_time = Duration::try_from_secs_f64(config.window_seconds).map_err(|_| {
            format!(
                "--drift-window-seconds must be a number of seconds, not {}",
                config.window_seconds
            )
        })?;
        if !(config.drift_share > 0.0 && config.drift_share <= 1.0) {
            return Err(format!(
                "--drift-share must be within (0, 1], not {}",
                config.drift_share
            ));
        }
        let metrics = registry
            .map(DriftMetrics::register)
            .transpose()
            .map_err(|e| format!("drift metrics: {e}"))?;
        Ok(Self {
            config,
            window_time,
            versions: RwLock::new(HashMap::new()),
            events,
            metrics,
            running: Mutex::new(BTreeSet::new()),
            serving: std::sync::OnceLock::new(),
        })
    }

    pub fn config(&self) -> &DriftConfig {
        &self.config
    }

    /// Records one request's answered rows for a version (`features` names the pipeline's
    /// inputs; `baseline` is the version's manifest `drift_baseline`, read the first time).
    pub fn observe(
        self: &Arc<Self>,
        model: &str,
        version: u64,
        features: &[String],
        baseline: &Value,
        rows: &[ObservedRow<'_>],
    ) {
        if self.config.window_rows == 0 || rows.is_empty() {
            return;
        }
        let Some(state) = self.state(model, version, features, baseline) else {
            return;
        };
        let start = {
            let mut state = state.lock().unwrap_or_else(|p| p.into_inner());
            for row in rows {
                record(&mut state.window, row);
            }
            if let Some(closed) = self.close_if_due(&mut state) {
                if state.pending.len() >= WAITING_WINDOWS {
                    state.pending.pop_front();
                    state.windows_skipped += 1;
                    self.count_window(model, version, "skipped");
                }
                state.pending.push_back(closed);
            }
            let start = !state.judging && !state.pending.is_empty();
            state.judging |= start;
            start
        };
        if start {
            let monitor = self.clone();
            let model = model.to_string();
            tokio::task::spawn_blocking(move || monitor.judge_pending(&model, version, &state));
        }
    }

    fn count_window(&self, model: &str, version: u64, result: &str) {
        if let Some(metrics) = &self.metrics {
            metrics
                .windows
                .with_label_values(&[model, &version.to_string(), result])
                .inc();
        }
    }

    /// Judges a version's closed windows one after another, until none waits.
    fn judge_pending(self: &Arc<Self>, model: &str, version: u64, state: &Mutex<VersionDrift>) {
        loop {
            let (window, baseline, names) = {
                let mut state = state.lock().unwrap_or_else(|p| p.into_inner());
                match state.pending.pop_front() {
                    Some((window, baseline)) => (window, baseline, state.names.clone()),
                    None => {
                        state.judging = false;
                        return;
                    }
                }
            };
            self.judged(model, version, state, &names, &window, &baseline);
        }
    }

    fn state(
        &self,
        model: &str,
        version: u64,
        features: &[String],
        baseline: &Value,
    ) -> Option<SharedVersion> {
        let known = |state: &SharedVersion| {
            let state = state.lock().unwrap_or_else(|p| p.into_inner());
            state.names.len() == features.len() + 1 && state.names[..features.len()] == *features
        };
        if let Some(state) = self
            .versions
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(model)
            .and_then(|versions| versions.get(&version))
            .filter(|state| known(state))
        {
            return Some(state.clone());
        }
        let mut names = features.to_vec();
        names.push(PREDICTION.to_string());
        let baseline = DriftBaseline::from_manifest(baseline).map(|b| {
            let columns = b
                .inputs
                .into_iter()
                .chain([b.prediction])
                .map(|c| (c.name.clone(), c))
                .collect();
            Arc::new(Baseline {
                source: BaselineSource::Manifest,
                columns,
            })
        });
        // A baseline that names none of the columns judges nothing: the first rows instead.
        let baseline = baseline.filter(|b| names.iter().any(|n| b.columns.contains_key(n)));
        let fresh = VersionDrift {
            window: Window::new(names.len()),
            names,
            baseline,
            reports: Vec::new(),
            windows_judged: 0,
            windows_drifted: 0,
            drifting: false,
            pending: std::collections::VecDeque::new(),
            judging: false,
            windows_skipped: 0,
        };
        let mut versions = self.versions.write().unwrap_or_else(|p| p.into_inner());
        // Asked under the lock `forget` takes, after the model table changed: a version retired
        // before this point is not served, one retired after it is forgotten after this insert.
        if self
            .serving
            .get()
            .is_some_and(|serving| !serving(model, version))
        {
            return None;
        }
        Some(
            match versions
                .entry(model.to_string())
                .or_default()
                .entry(version)
            {
                // Another request made it meanwhile.
                Entry::Occupied(state) if known(state.get()) => state.get().clone(),
                // The version came back with another pipeline: its old state no longer fits.
                Entry::Occupied(mut state) => {
                    let fresh = Arc::new(Mutex::new(fresh));
                    state.insert(fresh.clone());
                    fresh
                }
                Entry::Vacant(slot) => slot.insert(Arc::new(Mutex::new(fresh))).clone(),
            },
        )
    }

    /// Tells the monitor how to ask whether a version is still served.
    pub fn set_serving(&self, serving: VersionServed) {
        if self.serving.set(serving).is_err() {
            tracing::warn!("the drift monitor's serving check was set twice; the first stays");
        }
    }

    /// Takes the window when it is due: the rows that make a missing baseline, or a window to
    /// judge (with the baseline to judge it against).
    fn close_if_due(&self, state: &mut VersionDrift) -> Option<(Window, Arc<Baseline>)> {
        let rows = state.window.rows;
        let Some(baseline) = state.baseline.clone() else {
            if rows >= self.config.reference_rows.max(1) {
                let window = std::mem::replace(&mut state.window, Window::new(state.names.len()));
                let columns = state
                    .names
                    .iter()
                    .zip(&window.columns)
                    .map(|(name, column)| (name.clone(), column.baseline(name)))
                    .collect();
                state.baseline = Some(Arc::new(Baseline {
                    source: BaselineSource::FirstRequests,
                    columns,
                }));
            }
            return None;
        };
        let timed_out = rows >= self.config.min_window_rows.max(1)
            && state.window.started.elapsed() >= self.window_time;
        (rows >= self.config.window_rows || timed_out).then(|| {
            let window = std::mem::replace(&mut state.window, Window::new(state.names.len()));
            (window, baseline)
        })
    }

    /// Judges a closed window, keeps the report and announces it.
    fn judged(
        self: &Arc<Self>,
        model: &str,
        version: u64,
        state: &Mutex<VersionDrift>,
        features: &[String],
        window: &Window,
        baseline: &Baseline,
    ) {
        let report = Arc::new(judge(
            model,
            version,
            features,
            window,
            baseline,
            self.config.drift_share,
        ));
        // Metrics first, then the report: whoever sees the report sees its metrics too.
        let version_label = version.to_string();
        // Published under the read lock `forget` waits for, and only while this very state is
        // the version's: a version forgotten (or loaded anew) while its window was judged gets
        // no series, event or command from it.
        let versions = self.versions.read().unwrap_or_else(|p| p.into_inner());
        let current = versions
            .get(model)
            .and_then(|of_model| of_model.get(&version))
            .is_some_and(|known| std::ptr::eq(Arc::as_ptr(known), state));
        if !current {
            return;
        }
        if let Some(metrics) = &self.metrics {
            let result = if report.dataset_drift {
                "drift"
            } else {
                "no_drift"
            };
            metrics
                .windows
                .with_label_values(&[model, &version_label, result])
                .inc();
            metrics
                .share
                .with_label_values(&[model, &version_label])
                .set(report.share_drifted);
            for column in &report.columns {
                let labels = [model, version_label.as_str(), column.column.as_str()];
                metrics
                    .column_drifted
                    .with_label_values(&labels)
                    .set(f64::from(u8::from(column.drifted)));
                if let Some(psi) = column.psi {
                    metrics.column_psi.with_label_values(&labels).set(psi);
                }
            }
        }
        let started_drifting = {
            let mut state = state.lock().unwrap_or_else(|p| p.into_inner());
            state.windows_judged += 1;
            state.windows_drifted += u64::from(report.dataset_drift);
            state.reports.insert(0, report.clone());
            state.reports.truncate(KEPT_REPORTS);
            let started = report.dataset_drift && !state.drifting;
            state.drifting = report.dataset_drift;
            started
        };
        drop(versions);
        if !report.dataset_drift {
            return;
        }
        tracing::warn!(
            model,
            version,
            drifted = ?report.drifted_columns,
            share = report.share_drifted,
            "drift detected"
        );
        if let Some(events) = &self.events {
            let mut fields = Map::new();
            fields.insert("model".into(), model.into());
            fields.insert("version".into(), version.into());
            fields.insert("share_drifted".into(), report.share_drifted.into());
            fields.insert(
                "drifted_columns".into(),
                Value::from(report.drifted_columns.clone()),
            );
            fields.insert("window_rows".into(), report.window_rows.into());
            fields.insert(
                "baseline".into(),
                serde_json::to_value(report.baseline).unwrap_or(Value::Null),
            );
            events.log(Record::event("drift.detected", model, now_ms(), fields));
        }
        if started_drifting && let Some(command) = self.config.commands.get(model) {
            self.start_command(model, version, command, &report);
        }
    }

    /// Starts the model's drift command on a thread of its own, unless one is running for the
    /// model; it is killed after [`COMMAND_LIMIT`].
    fn start_command(
        self: &Arc<Self>,
        model: &str,
        version: u64,
        command: &str,
        report: &DriftReport,
    ) {
        if !self
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(model.to_string())
        {
            self.count_command(model, "skipped");
            return;
        }
        let child = std::process::Command::new("sh")
            .arg("-c")
            .arg(command)
            .env("MARQUEE_DRIFT_MODEL", model)
            .env("MARQUEE_DRIFT_VERSION", version.to_string())
            .env(
                "MARQUEE_DRIFT_REPORT",
                serde_json::to_string(report).unwrap_or_default(),
            )
            .spawn();
        let (monitor, model, command) = (self.clone(), model.to_string(), command.to_string());
        std::thread::spawn(move || {
            let outcome = match child {
                Ok(mut child) => match wait_within(&mut child, COMMAND_LIMIT) {
                    Ok(Some(status)) if status.success() => "succeeded",
                    Ok(Some(status)) => {
                        tracing::warn!(model, command, %status, "drift command failed");
                        "failed"
                    }
                    Ok(None) => {
                        tracing::warn!(model, command, "drift command ran too long; killed");
                        let _ = child.kill();
                        let _ = child.wait();
                        "failed"
                    }
                    Err(error) => {
                        tracing::warn!(model, command, %error, "drift command");
                        "failed"
                    }
                },
                Err(error) => {
                    tracing::warn!(model, command, %error, "drift command did not start");
                    "failed"
                }
            };
            monitor
                .running
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&model);
            monitor.count_command(&model, outcome);
        });
    }

    fn count_command(&self, model: &str, outcome: &str) {
        if let Some(metrics) = &self.metrics {
            metrics.commands.with_label_values(&[model, outcome]).inc();
        }
    }

    /// Drops what the monitor holds of versions no longer served, and their metric series, so
    /// neither grows with the versions a server has served.
    pub fn forget(&self, model: &str, versions: &[u64]) {
        let removed: Vec<(u64, SharedVersion)> = {
            let mut all = self.versions.write().unwrap_or_else(|p| p.into_inner());
            let Some(of_model) = all.get_mut(model) else {
                return;
            };
            let removed = versions
                .iter()
                .filter_map(|v| of_model.remove(v).map(|state| (*v, state)))
                .collect();
            if of_model.is_empty() {
                all.remove(model);
            }
            removed
        };
        let Some(metrics) = &self.metrics else {
            return;
        };
        for (version, state) in removed {
            let version = version.to_string();
            let names = state
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .names
                .clone();
            for result in ["drift", "no_drift", "skipped"] {
                let _ = metrics
                    .windows
                    .remove_label_values(&[model, &version, result]);
            }
            let _ = metrics.share.remove_label_values(&[model, &version]);
            for name in &names {
                let labels = [model, version.as_str(), name.as_str()];
                let _ = metrics.column_drifted.remove_label_values(&labels);
                let _ = metrics.column_psi.remove_label_values(&labels);
            }
        }
    }

    /// What the monitor holds of a model's versions.
    pub fn view(&self, model: &str) -> Vec<VersionDriftView> {
        let versions = self
            .versions
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(model)
            .cloned()
            .unwrap_or_default();
        versions
            .into_iter()
            .map(|(version, state)| {
                let state = state.lock().unwrap_or_else(|p| p.into_inner());
                let collecting = state.baseline.is_none();
                VersionDriftView {
                    version,
                    baseline: state.baseline.as_ref().map(|b| b.source),
                    baseline_rows_collected: if collecting { state.window.rows } else { 0 },
                    current_window_rows: if collecting { 0 } else { state.window.rows },
                    windows_judged: state.windows_judged,
                    windows_drifted: state.windows_drifted,
                    reports: state.reports.iter().map(|r| (**r).clone()).collect(),
                }
            })
            .collect()
    }
}

/// Waits for a child process for at most `limit`; `None` when it is still running.
fn wait_within(
    child: &mut std::process::Child,
    limit: Duration,
) -> std::io::Result<Option<std::process::ExitStatus>> {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if started.elapsed() >= limit {
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Adds one row's cells to a window (vector and missing values are not judged).
fn record(window: &mut Window, row: &ObservedRow<'_>) {
    window.rows += 1;
    let columns = window.columns.len();
    let (features, last) = window.columns.split_at_mut(columns - 1);
    for (column, value) in features.iter_mut().zip(row.inputs) {
        match value {
            FeatureValue::Int(v) => column.push(Cell::Number(*v as f64)),
            FeatureValue::Float(v) if !v.is_nan() => column.push(Cell::Number(*v)),
            FeatureValue::Bool(v) => column.push(Cell::Number(f64::from(u8::from(*v)))),
            FeatureValue::String(v) => column.push(Cell::Category(v)),
            _ => {}
        }
    }
    let prediction = &mut last[0];
    match (row.prediction, row.label) {
        (_, Some(label)) => prediction.push(Cell::Category(label)),
        (Some(Value::Number(n)), None) => {
            if let Some(v) = n.as_f64() {
                prediction.push(Cell::Number(v));
            }
        }
        (Some(Value::Bool(b)), None) => prediction.push(Cell::Number(f64::from(u8::from(*b)))),
        _ => {}
    }
}

/// Judges every column of a window against the baseline.
fn judge(
    model: &str,
    version: u64,
    features: &[String],
    window: &Window,
    baseline: &Baseline,
    drift_share: f64,
) -> DriftReport {
    let names = features.iter().map(String::as_str).chain([PREDICTION]);
    let columns: Vec<ColumnDrift> = names
        .zip(&window.columns)
        .map(|(name, current)| match baseline.columns.get(name) {
            Some(reference) => judge_column(name, reference, current),
            None => skipped(name, current, "not in the baseline"),
        })
        .collect();
    let judged_columns = columns.iter().filter(|c| c.test.is_some()).count();
    let drifted_columns: Vec<String> = columns
        .iter()
        .filter(|c| c.drifted)
        .map(|c| c.column.clone())
        .collect();
    let share_drifted = if judged_columns == 0 {
        0.0
    } else {
        drifted_columns.len() as f64 / judged_columns as f64
    };
    DriftReport {
        model: model.to_string(),
        version,
        baseline: baseline.source,
        window_rows: window.rows,
        window_started: rfc3339(window.started_ms),
        window_closed: rfc3339(now_ms()),
        columns,
        judged_columns,
        share_drifted,
        drift_share,
        dataset_drift: judged_columns > 0 && share_drifted >= drift_share,
        drifted_columns,
    }
}

fn skipped(name: &str, current: &ColumnWindow, why: &str) -> ColumnDrift {
    ColumnDrift {
        column: name.to_string(),
        test: None,
        statistic: None,
        p_value: None,
        threshold: 0.0,
        drifted: false,
        psi: None,
        reference_rows: 0,
        current_rows: current.rows,
        skipped: Some(why.to_string()),
    }
}

/// The test Evidently's defaults choose for a column, and its verdict.
fn judge_column(name: &str, reference: &ColumnBaseline, current: &ColumnWindow) -> ColumnDrift {
    if current.rows == 0 || reference.rows == 0 {
        return skipped(name, current, "no values");
    }
    let numeric = !reference.values.is_empty() && !current.numbers.is_empty();
    let counted = !reference.categories.is_empty() && !current.overflowed;
    if !numeric && !counted {
        return skipped(
            name,
            current,
            "text: more distinct values than are counted, and not numbers",
        );
    }
    let current_counts = current.counts();
    let keys: BTreeSet<&String> = if counted {
        reference
            .categories
            .keys()
            .chain(current_counts.keys())
            .collect()
    } else {
        BTreeSet::new()
    };
    let few_values = counted && keys.len() <= FEW_VALUES;
    let small = reference.rows <= SMALL_REFERENCE;
    let counts = |categories: &BTreeMap<String, u64>| -> Vec<f64> {
        keys.iter()
            .map(|k| categories.get(*k).copied().unwrap_or(0) as f64)
            .collect()
    };
    let (test, statistic, p_value) = if numeric && !few_values {
        if small {
            let (d, p) =
                stats::ks_two_sample(&reference.values, &current.numbers).unwrap_or((0.0, 1.0));
            (DriftTest::Ks, d, Some(p))
        } else {
            let distance = stats::wasserstein(&reference.values, &current.numbers).unwrap_or(0.0)
                / reference.std.max(0.001);
            (DriftTest::Wasserstein, distance, None)
        }
    } else {
        let (expected, observed) = (counts(&reference.categories), counts(&current_counts));
        if !small {
            let distance = stats::jensen_shannon(&expected, &observed).unwrap_or(0.0);
            (DriftTest::JensenShannon, distance, None)
        } else if keys.len() > 2 {
            let scale = current.rows as f64 / reference.rows as f64;
            let expected: Vec<f64> = expected.iter().map(|e| e * scale).collect();
            let (statistic, p) = stats::chi_square_fit(&observed, &expected).unwrap_or((0.0, 1.0));
            (DriftTest::ChiSquare, statistic, Some(p))
        } else {
            // Two values (or one): the share of the first in the reference against the current.
            let d = stats::two_proportions(
                expected[0] as u64,
                reference.rows,
                observed[0] as u64,
                current.rows as u64,
                0.95,
            );
            (DriftTest::ZTest, d.estimate, Some(d.p_value))
        }
    };
    let (threshold, drifted) = match p_value {
        Some(p) => (P_THRESHOLD, p < P_THRESHOLD),
        None => (DISTANCE_THRESHOLD, statistic >= DISTANCE_THRESHOLD),
    };
    let psi = if numeric && !reference.counts.is_empty() {
        let mut bins = vec![0.0; reference.counts.len()];
        let last = bins.len() - 1;
        for &value in &current.numbers {
            bins[bin(&reference.edges, value).min(last)] += 1.0;
        }
        let expected: Vec<f64> = reference.counts.iter().map(|&c| c as f64).collect();
        stats::psi(&expected, &bins)
    } else if counted {
        stats::psi(&counts(&reference.categories), &counts(&current_counts))
    } else {
        None
    };
    ColumnDrift {
        column: name.to_string(),
        test: Some(test),
        statistic: Some(statistic),
        p_value,
        threshold,
        drifted,
        psi,
        reference_rows: reference.rows,
        current_rows: current.rows,
        skipped: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn column(values: &[f64]) -> ColumnWindow {
        let mut column = ColumnWindow::default();
        values.iter().for_each(|&v| column.push(Cell::Number(v)));
        column
    }

    fn spread(n: usize, shift: f64) -> Vec<f64> {
        (0..n)
            .map(|i| (i * 7919 % 1000) as f64 / 1000.0 + shift)
            .collect()
    }

    #[test]
    fn tests_are_chosen_as_evidently_chooses_them() {
        let small = ColumnBaseline::numeric("x", &spread(800, 0.0));
        assert_eq!(
            judge_column("x", &small, &column(&spread(300, 0.0))).test,
            Some(DriftTest::Ks)
        );
        let large = ColumnBaseline::numeric("x", &spread(5000, 0.0));
        let verdict = judge_column("x", &large, &column(&spread(300, 0.0)));
        assert_eq!(verdict.test, Some(DriftTest::Wasserstein));
        assert!(!verdict.drifted, "{verdict:?}");
        let flags: Vec<f64> = (0..800).map(|i| f64::from(i % 2)).collect();
        let reference = ColumnBaseline::numeric("flag", &flags);
        assert_eq!(
            judge_column("flag", &reference, &column(&flags)).test,
            Some(DriftTest::ZTest)
        );
        let levels: Vec<f64> = (0..800).map(|i| f64::from(i % 4)).collect();
        let reference = ColumnBaseline::numeric("level", &levels);
        assert_eq!(
            judge_column("level", &reference, &column(&levels)).test,
            Some(DriftTest::ChiSquare)
        );
        let large = ColumnBaseline::numeric("level", &levels.repeat(3));
        assert_eq!(
            judge_column("level", &large, &column(&levels)).test,
            Some(DriftTest::JensenShannon)
        );
        let mut devices = ColumnWindow::default();
        ["ios", "web", "android"]
            .iter()
            .for_each(|d| devices.push(Cell::Category(d)));
        let reference = ColumnBaseline::categorical("device", ["ios", "web", "android", "ios"]);
        assert_eq!(
            judge_column("device", &reference, &devices).test,
            Some(DriftTest::ChiSquare)
        );
        let mut text = ColumnWindow::default();
        (0..100).for_each(|i| text.push(Cell::Category(&format!("review {i}"))));
        let reference = ColumnBaseline::categorical("review", ["a", "b"]);
        assert!(judge_column("review", &reference, &text).skipped.is_some());
    }

    #[test]
    fn a_shifted_column_drifts_and_an_unshifted_one_does_not() {
        for reference_rows in [800, 5000] {
            let reference = ColumnBaseline::numeric("x", &spread(reference_rows, 0.0));
            let same = judge_column("x", &reference, &column(&spread(500, 0.0)));
            let shifted = judge_column("x", &reference, &column(&spread(500, 0.3)));
            assert!(!same.drifted && shifted.drifted, "{same:?} {shifted:?}");
            assert!(shifted.psi.unwrap() > same.psi.unwrap());
        }
    }

    /// Uniform values in [0, 1) from SplitMix64.
    fn uniform(seed: u64, n: usize) -> Vec<f64> {
        (0..n as u64)
            .map(|i| {
                let mut z = seed
                    .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                    .wrapping_add(i.wrapping_mul(0xBF58_476D_1CE4_E5B9));
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                z ^= z >> 31;
                (z >> 11) as f64 / (1u64 << 53) as f64
            })
            .collect()
    }

    #[test]
    fn the_false_alarm_rate_is_the_tests_level() {
        // Unshifted windows against their reference: KS at p < 0.05 alarms about one time in
        // twenty, per column. (A dataset of eleven columns has some column alarm in about 43%
        // of its windows, which is why dataset drift asks for a share of columns.)
        let trials = 400;
        let alarms = (0..trials)
            .filter(|&seed| {
                let reference = ColumnBaseline::numeric("x", &uniform(2 * seed, 300));
                judge_column("x", &reference, &column(&uniform(2 * seed + 1, 300))).drifted
            })
            .count();
        let rate = alarms as f64 / trials as f64;
        assert!((0.025..=0.08).contains(&rate), "false-alarm rate {rate}");
    }
}
