//! Prometheus metrics, served as text on their own port (8002 by default, as Triton does).
//!
//! Series are labelled by model and version. Each loaded version resolves its label values once
//! into a [`ModelMetrics`], so the request path only touches atomics.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// The server's metric families.
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    inferences: IntCounterVec,
    executions: IntCounterVec,
    request_duration: HistogramVec,
    queue_duration: HistogramVec,
    compute_duration: HistogramVec,
    batch_size: HistogramVec,
    queue_depth: IntGaugeVec,
    predict_cache: IntCounterVec,
    predict_degraded: IntCounterVec,
    rejected: IntCounterVec,
    panics: IntCounter,
    variant_requests: IntCounterVec,
    variant_duration: HistogramVec,
    shadow_dropped: IntCounterVec,
    /// How many live `ModelMetrics` hold each (model, version)'s series; the series go when the
    /// last one does, so unloaded versions leave no stale gauges or growing label sets.
    holders: Mutex<HashMap<(String, String), Holders>>,
}

/// The live handles of one version's series, and the failure outcomes they counted.
#[derive(Default)]
struct Holders {
    count: usize,
    failed_outcomes: FailedOutcomes,
}

/// The failure outcomes a version has counted, shared by its handles (each failure locks only its
/// own version's set).
type FailedOutcomes = Arc<Mutex<BTreeSet<&'static str>>>;

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let labels = &["model", "version"];
        let latency_buckets =
            prometheus::exponential_buckets(50e-6, 2.0, 18).expect("valid buckets");
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let histogram = |name: &str, help: &str, buckets: Vec<f64>| {
            let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)
                .expect("valid metric");
            registry
                .register(Box::new(h.clone()))
                .expect("unique metric");
            h
        };
        let requests = counter(
            "marquee_requests_total",
            "Inference requests by outcome: success, or the reason they failed",
            &["model", "version", "outcome"],
        );
        let inferences = counter(
            "marquee_inferences_total",
            "Rows inferred (a request with a batch of 8 counts 8)",
            labels,
        );
        let executions = counter(
            "marquee_executions_total",
            "Model executions (batches run)",
            labels,
        );
        let predict_cache = counter(
            "marquee_predict_cache_total",
            "/v1/predict response-cache lookups by result (hit or miss)",
            &["model", "result"],
        );
        let predict_degraded = counter(
            "marquee_predict_degraded_total",
            "/v1/predict answers that fell back, by what fell back (features, timeout)",
            &["model", "reason"],
        );
        let rejected = counter(
            "marquee_rejected_requests_total",
            "Requests refused to protect the server, by reason (concurrency_limit, queue_full, too_large)",
            &["reason"],
        );
        let panics = IntCounter::new(
            "marquee_handler_panics_total",
            "Request handlers that panicked (answered 500 / INTERNAL)",
        )
        .expect("valid metric");
        registry
            .register(Box::new(panics.clone()))
            .expect("unique metric");
        let variant_requests = counter(
            "marquee_variant_requests_total",
            "Requests routed by a traffic policy, by variant (control, a variant's name, shadow) and outcome (success, client_error, server_error)",
            &["model", "variant", "outcome"],
        );
        let shadow_dropped = counter(
            "marquee_shadow_dropped_total",
            "Requests a traffic policy would have mirrored but dropped because the shadow places were full",
            &["model"],
        );
        let variant_duration = HistogramVec::new(
            HistogramOpts::new(
                "marquee_variant_request_duration_seconds",
                "Time routed requests took, by variant",
            )
            .buckets(latency_buckets.clone()),
            &["model", "variant"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(variant_duration.clone()))
            .expect("unique metric");
        let request_duration = histogram(
            "marquee_request_duration_seconds",
            "End-to-end time of successful requests inside the model, queue included",
            latency_buckets.clone(),
        );
        let queue_duration = histogram(
            "marquee_queue_duration_seconds",
            "Time requests waited in the batching queue",
            latency_buckets.clone(),
        );
        let compute_duration = histogram(
            "marquee_compute_duration_seconds",
            "Time a batch took to execute (inputs, inference, outputs)",
            latency_buckets,
        );
        let batch_size = histogram(
            "marquee_batch_size",
            "Rows per executed batch",
            prometheus::exponential_buckets(1.0, 2.0, 12).expect("valid buckets"),
        );
        let queue_depth = IntGaugeVec::new(
            Opts::new(
                "marquee_queue_depth",
                "Requests waiting in the batching queue",
            ),
            labels,
        )
        .expect("valid metric");
        registry
            .register(Box::new(queue_depth.clone()))
            .expect("unique metric");
        #[cfg(target_os = "linux")]
        registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("unique metric");
        Self {
            registry,
            requests,
            inferences,
            executions,
            request_duration,
            queue_duration,
            compute_duration,
            batch_size,
            queue_depth,
            predict_cache,
            predict_degraded,
            rejected,
            panics,
            variant_requests,
            variant_duration,
            shadow_dropped,
            holders: Mutex::new(HashMap::new()),
        }
    }

    /// A request refused for `reason` (see `marquee_rejected_requests_total`).
    pub fn rejected(&self, reason: &str) {
        self.rejected.with_label_values(&[reason]).inc();
    }

    /// A request handler panicked.
    pub fn handler_panicked(&self) {
        self.panics.inc();
    }

    /// The series one traffic variant of a model is counted in.
    pub fn variant_series(&self, model: &str, variant: &str) -> VariantSeries {
        VariantSeries {
            labels: [model.to_string(), variant.to_string()],
            requests: self.variant_requests.clone(),
            duration: self.variant_duration.clone(),
            by_outcome: Default::default(),
            duration_series: OnceLock::new(),
        }
    }

    /// A request not mirrored to a model's shadow version: the shadow places were full.
    pub fn shadow_dropped(&self, model: &str) {
        self.shadow_dropped.with_label_values(&[model]).inc();
    }

    /// One `/v1/predict` response-cache lookup.
    pub fn predict_cache(&self, model: &str, hit: bool) {
        self.predict_cache
            .with_label_values(&[model, if hit { "hit" } else { "miss" }])
            .inc();
    }

    /// `answers` `/v1/predict` answers that fell back for `reason`.
    pub fn predict_degraded(&self, model: &str, reason: &str, answers: usize) {
        self.predict_degraded
            .with_label_values(&[model, reason])
            .inc_by(answers as u64);
    }

    /// Handles for one model version's series; they are removed when the last handle for that
    /// version is dropped.
    pub fn for_model(self: &Arc<Self>, model: &str, version: u64) -> ModelMetrics {
        let version = version.to_string();
        let labels = [model, version.as_str()];
        let failed_outcomes = {
            let mut holders = self.holders.lock().unwrap_or_else(|p| p.into_inner());
            let entry = holders
                .entry((model.to_string(), version.clone()))
                .or_default();
            entry.count += 1;
            entry.failed_outcomes.clone()
        };
        ModelMetrics {
            family: self.clone(),
            failed_outcomes,
            model: model.to_string(),
            version: version.clone(),
            succeeded: self
                .requests
                .with_label_values(&[model, &version, "success"]),
            inferences: self.inferences.with_label_values(&labels),
            executions: self.executions.with_label_values(&labels),
            request_duration: self.request_duration.with_label_values(&labels),
            queue_duration: self.queue_duration.with_label_values(&labels),
            compute_duration: self.compute_duration.with_label_values(&labels),
            batch_size: self.batch_size.with_label_values(&labels),
            queue_depth: self.queue_depth.with_label_values(&labels),
        }
    }

    /// Removes one version's series once no handle holds them.
    fn release(&self, model: &str, version: &str) {
        let mut holders = self.holders.lock().unwrap_or_else(|p| p.into_inner());
        let key = (model.to_string(), version.to_string());
        let Some(entry) = holders.get_mut(&key) else {
            return;
        };
        entry.count -= 1;
        if entry.count > 0 {
            return;
        }
        let failed_outcomes = holders.remove(&key).unwrap_or_default().failed_outcomes;
        let failed_outcomes = failed_outcomes.lock().unwrap_or_else(|p| p.into_inner());
        let labels = [model, version];
        for outcome in failed_outcomes.iter().copied().chain(["success"]) {
            let _ = self
                .requests
                .remove_label_values(&[model, version, outcome]);
        }
        let _ = self.inferences.remove_label_values(&labels);
        let _ = self.executions.remove_label_values(&labels);
        for histogram in [
            &self.request_duration,
            &self.queue_duration,
            &self.compute_duration,
            &self.batch_size,
        ] {
            let _ = histogram.remove_label_values(&labels);
        }
        let _ = self.queue_depth.remove_label_values(&labels);
    }

    /// Where other parts of the server (the event log) register their series.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The Prometheus text exposition of every series.
    pub fn render(&self) -> String {
        TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .unwrap_or_else(|e| format!("# metrics could not be encoded: {e}\n"))
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// One model version's series.
pub struct ModelMetrics {
    family: Arc<Metrics>,
    failed_outcomes: FailedOutcomes,
    model: String,
    version: String,
    succeeded: IntCounter,
    inferences: IntCounter,
    executions: IntCounter,
    request_duration: Histogram,
    queue_duration: Histogram,
    compute_duration: Histogram,
    batch_size: Histogram,
    queue_depth: IntGauge,
}

impl Drop for ModelMetrics {
    fn drop(&mut self) {
        self.family.release(&self.model, &self.version);
    }
}

impl ModelMetrics {
    pub fn request_succeeded(&self, total: Duration, queue: Duration) {
        self.succeeded.inc();
        self.request_duration.observe(total.as_secs_f64());
        self.queue_duration.observe(queue.as_secs_f64());
    }

    pub fn request_failed(&self, reason: &'static str) {
        // Remembered so the series can be removed with the version.
        self.failed_outcomes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(reason);
        self.family
            .requests
            .with_label_values(&[&self.model, &self.version, reason])
            .inc();
    }

    pub fn batch_executed(&self, rows: usize, compute: Duration) {
        self.executions.inc();
        self.inferences.inc_by(rows as u64);
        self.batch_size.observe(rows as f64);
        self.compute_duration.observe(compute.as_secs_f64());
    }

    pub fn queue_depth(&self, depth: usize) {
        self.queue_depth.set(depth as i64);
    }
}

/// The outcome label of a routed request: success, the client's fault, the version's fault.
pub const OUTCOME_LABELS: [&str; 3] = ["success", "client_error", "server_error"];

/// One traffic variant's series, resolved at its first request under a policy (not before, so
/// an outcome that never happened shows no series), so a routed request hashes no labels.
pub struct VariantSeries {
    /// Model and variant.
    labels: [String; 2],
    requests: IntCounterVec,
    duration: HistogramVec,
    /// By outcome, in [`OUTCOME_LABELS`]' order.
    by_outcome: [OnceLock<IntCounter>; 3],
    duration_series: OnceLock<Histogram>,
}

impl VariantSeries {
    /// One request answered after `latency` with the outcome at `outcome` in [`OUTCOME_LABELS`].
    pub fn record(&self, outcome: usize, latency: Duration) {
        let [model, variant] = &self.labels;
        self.by_outcome[outcome]
            .get_or_init(|| {
                self.requests
                    .with_label_values(&[model.as_str(), variant, OUTCOME_LABELS[outcome]])
            })
            .inc();
        self.duration_series
            .get_or_init(|| self.duration.with_label_values(&[model.as_str(), variant]))
            .observe(latency.as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_series_appear_with_labels() {
        let metrics = Arc::new(Metrics::new());
        let m = metrics.for_model("gbr", 1);
        m.request_succeeded(Duration::from_millis(2), Duration::from_micros(300));
        m.request_failed("timeout");
        m.batch_executed(8, Duration::from_millis(1));
        m.queue_depth(3);
        let text = metrics.render();
        assert!(
            text.contains(r#"marquee_requests_total{model="gbr",outcome="success",version="1"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"marquee_requests_total{model="gbr",outcome="timeout",version="1"} 1"#)
        );
        assert!(text.contains(r#"marquee_inferences_total{model="gbr",version="1"} 8"#));
        assert!(text.contains(r#"marquee_executions_total{model="gbr",version="1"} 1"#));
        assert!(text.contains(r#"marquee_queue_depth{model="gbr",version="1"} 3"#));
        assert!(text.contains("marquee_batch_size_bucket"));
        assert!(text.contains("marquee_queue_duration_seconds_bucket"));
        assert!(text.contains("process_resident_memory_bytes"));
    }

    #[test]
    fn a_versions_series_go_with_its_last_handle() {
        let metrics = Arc::new(Metrics::new());
        let first = metrics.for_model("gbr", 1);
        let second = metrics.for_model("gbr", 1);
        let other = metrics.for_model("gbr", 2);
        first.request_failed("timeout");
        first.queue_depth(5);
        other.queue_depth(1);
        drop(first);
        assert!(
            metrics
                .render()
                .contains(r#"marquee_queue_depth{model="gbr",version="1"} 5"#)
        );
        drop(second);
        let text = metrics.render();
        assert!(!text.contains(r#"version="1""#), "{text}");
        assert!(
            text.contains(r#"marquee_queue_depth{model="gbr",version="2"} 1"#),
            "{text}"
        );
    }
}
