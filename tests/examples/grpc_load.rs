//! An open-loop gRPC load generator for soak runs: `ModelInfer` requests for the fraud-style model
//! (`iforest`: one FP32 row of WIDTH features in `X`) leave at a fixed RATE per second for SECONDS, whether or not
//! earlier ones were answered, over a few HTTP/2 connections. Latency is measured from each
//! request's scheduled send time. At most MAX_OUTSTANDING requests are in flight; one that cannot
//! be sent is counted as dropped. Prints one JSON line per REPORT_SECONDS interval (answered,
//! errors, dropped, p50/p99 of the requests sent in it) and one for the whole run.
//!
//!     cargo run --release -p marquee-tests --example grpc_load -- ADDRESS MODEL WIDTH RATE SECONDS REPORT_SECONDS

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use marquee_proto::inference as pb;
use marquee_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use marquee_tests::f32_bytes;

const MAX_OUTSTANDING: usize = 2048;
const CONNECTIONS: usize = 4;

/// What one interval's requests came to (each request counts in the interval it was sent in).
#[derive(Default)]
struct Interval {
    latencies_ms: Vec<f64>,
    errors: u64,
    dropped: u64,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, address, model, width, rate, seconds, report] = args.as_slice() else {
        return Err("usage: grpc_load ADDRESS MODEL WIDTH RATE SECONDS REPORT_SECONDS".into());
    };
    let width: usize = width.parse()?;
    let rate: f64 = rate.parse()?;
    let duration = Duration::from_secs_f64(seconds.parse()?);
    let report = Duration::from_secs_f64(report.parse()?);
    let intervals = (duration.as_secs_f64() / report.as_secs_f64()).ceil() as usize;
    let mut clients = Vec::with_capacity(CONNECTIONS);
    for _ in 0..CONNECTIONS {
        clients.push(GrpcInferenceServiceClient::connect(address.clone()).await?);
    }
    let values: Vec<f32> = (0..width).map(|i| i as f32 / 7.0).collect();
    let request = pb::ModelInferRequest {
        model_name: model.clone(),
        inputs: vec![pb::model_infer_request::InferInputTensor {
            name: "X".into(),
            datatype: "FP32".into(),
            shape: vec![1, width as i64],
            ..Default::default()
        }],
        raw_input_contents: vec![f32_bytes(&values).into()],
        ..Default::default()
    };
    let outstanding = Arc::new(tokio::sync::Semaphore::new(MAX_OUTSTANDING));
    // Failed requests by gRPC code, for the total line.
    let codes = Arc::new(std::sync::Mutex::new(std::collections::BTreeMap::<
        String,
        u64,
    >::new()));
    let errors: Arc<Vec<AtomicU64>> = Arc::new((0..intervals).map(|_| AtomicU64::new(0)).collect());
    let (sender, mut receiver) = tokio::sync::mpsc::unbounded_channel::<(usize, f64)>();
    let mut results: Vec<Interval> = (0..intervals).map(|_| Interval::default()).collect();
    let interval = Duration::from_secs_f64(1.0 / rate);
    let started = Instant::now();
    let mut sent = 0u64;
    loop {
        let due = started + interval.mul_f64(sent as f64);
        let offset = due.duration_since(started);
        if offset >= duration {
            break;
        }
        let slot = ((offset.as_secs_f64() / report.as_secs_f64()) as usize).min(intervals - 1);
        tokio::time::sleep_until(due.into()).await;
        sent += 1;
        let Ok(place) = outstanding.clone().try_acquire_owned() else {
            results[slot].dropped += 1;
            continue;
        };
        let mut client = clients[sent as usize % CONNECTIONS].clone();
        let (request, errors, sender) = (request.clone(), errors.clone(), sender.clone());
        let codes = codes.clone();
        tokio::spawn(async move {
            let _place = place;
            match client.model_infer(request).await {
                Ok(_) => {
                    let _ = sender.send((slot, due.elapsed().as_secs_f64() * 1e3));
                }
                Err(status) => {
                    errors[slot].fetch_add(1, Ordering::Relaxed);
                    let mut codes = codes.lock().expect("error codes");
                    *codes.entry(format!("{:?}", status.code())).or_insert(0) += 1;
                }
            }
        });
        while let Ok((slot, latency)) = receiver.try_recv() {
            results[slot].latencies_ms.push(latency);
        }
    }
    drop(sender);
    while let Some((slot, latency)) = receiver.recv().await {
        results[slot].latencies_ms.push(latency);
    }
    let mut all = Interval::default();
    for (i, result) in results.iter_mut().enumerate() {
        result.errors = errors[i].load(Ordering::Relaxed);
        print_interval(
            &format!(
                "\"interval\": {i}, \"from_s\": {:.0}",
                i as f64 * report.as_secs_f64()
            ),
            result,
            report.as_secs_f64(),
        );
        all.latencies_ms.extend_from_slice(&result.latencies_ms);
        all.errors += result.errors;
        all.dropped += result.dropped;
    }
    let codes = codes.lock().expect("error codes");
    let codes: Vec<String> = codes.iter().map(|(c, n)| format!("\"{c}\": {n}")).collect();
    print_interval(
        &format!(
            "\"total\": true, \"offered_per_second\": {rate}, \"sent\": {sent}, \"error_codes\": {{{}}}",
            codes.join(", ")
        ),
        &mut all,
        started.elapsed().as_secs_f64(),
    );
    Ok(())
}

fn print_interval(label: &str, interval: &mut Interval, seconds: f64) {
    let latencies = &mut interval.latencies_ms;
    latencies.sort_by(f64::total_cmp);
    let at = |q: f64| marquee_tests::quantile(latencies, q);
    println!(
        "{{{label}, \"answered\": {}, \"errors\": {}, \"dropped\": {}, \"per_second\": {:.1}, \"p50_ms\": {:.3}, \"p99_ms\": {:.3}}}",
        latencies.len(),
        interval.errors,
        interval.dropped,
        latencies.len() as f64 / seconds,
        at(0.5),
        at(0.99)
    );
}
