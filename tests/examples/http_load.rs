//! A closed-loop HTTP load generator for the JSON endpoints perf_analyzer cannot drive
//! (`/v1/predict`): CONCURRENCY clients each send one request, wait for the answer, and send the
//! next, for SECONDS. `{i}` in the body becomes a running request number and `{i%N}` that number
//! modulo N, so requests can differ (e.g. different user ids of a known range, to miss the
//! response cache). BODY `@FILE` takes the file's lines as bodies, one request each in turn.
//! Prints one JSON object.
//!
//!     cargo run --release -p marquee-tests --example http_load -- URL BODY CONCURRENCY SECONDS

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use marquee_tests::body::BodyTemplate;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, url, body, concurrency, seconds] = args.as_slice() else {
        return Err("usage: http_load URL BODY CONCURRENCY SECONDS".into());
    };
    let concurrency: usize = concurrency.parse()?;
    let duration = Duration::from_secs_f64(seconds.parse()?);
    let bodies: Arc<Vec<BodyTemplate>> = Arc::new(match body.strip_prefix('@') {
        Some(path) => std::fs::read_to_string(path)?
            .lines()
            .filter(|line| !line.trim().is_empty())
            .map(BodyTemplate::parse)
            .collect::<Result<_, _>>()?,
        None => vec![BodyTemplate::parse(body)?],
    });
    if bodies.is_empty() {
        return Err(format!("{body} holds no bodies").into());
    }
    let client = reqwest::Client::builder().tcp_nodelay(true).build()?;
    let counter = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let (client, url, bodies) = (client.clone(), url.clone(), bodies.clone());
        let (counter, errors) = (counter.clone(), errors.clone());
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            while started.elapsed() < duration {
                let i = counter.fetch_add(1, Ordering::Relaxed);
                let sent = Instant::now();
                let ok = match client
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(bodies[i as usize % bodies.len()].render(i))
                    .send()
                    .await
                {
                    Ok(response) => {
                        response.status().is_success() && response.bytes().await.is_ok()
                    }
                    Err(_) => false,
                };
                if ok {
                    latencies.push(sent.elapsed().as_secs_f64() * 1e3);
                } else {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
            latencies
        }));
    }
    let mut latencies = Vec::new();
    for worker in workers {
        latencies.extend(worker.await?);
    }
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort_by(f64::total_cmp);
    let at = |q: f64| marquee_tests::quantile(&latencies, q);
    println!(
        "{{\"requests\": {}, \"errors\": {}, \"per_second\": {:.1}, \"p50_ms\": {:.3}, \"p99_ms\": {:.3}}}",
        latencies.len(),
        errors.load(Ordering::Relaxed),
        latencies.len() as f64 / elapsed,
        at(0.5),
        at(0.99)
    );
    Ok(())
}
