//! An open-loop HTTP load generator: requests leave at a fixed RATE per second for SECONDS,
//! whether or not earlier ones were answered (as production traffic does; a closed loop would slow
//! down with the server and hide its queueing). Latency is measured from each request's scheduled
//! send time, so a client that falls behind counts against the server, not for it. At most
//! MAX_OUTSTANDING requests are in flight; one that cannot be sent is counted as dropped. `{i}` and
//! `{i%N}` in BODY are filled in per request, as in http_load. Prints one JSON object.
//!
//!     cargo run --release -p marquee-tests --example open_load -- URL BODY RATE SECONDS

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use marquee_tests::body::BodyTemplate;

const MAX_OUTSTANDING: usize = 4096;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, url, body, rate, seconds] = args.as_slice() else {
        return Err("usage: open_load URL BODY RATE SECONDS".into());
    };
    let rate: f64 = rate.parse()?;
    let body = BodyTemplate::parse(body)?;
    let duration = Duration::from_secs_f64(seconds.parse()?);
    let client = reqwest::Client::builder()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(MAX_OUTSTANDING)
        .build()?;
    let outstanding = Arc::new(tokio::sync::Semaphore::new(MAX_OUTSTANDING));
    let (errors, dropped) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let (sender, mut receiver) = tokio::sync::mpsc::unbounded_channel::<f64>();
    let interval = Duration::from_secs_f64(1.0 / rate);
    let started = Instant::now();
    let mut sent = 0u64;
    loop {
        let due = started + interval.mul_f64(sent as f64);
        if due.duration_since(started) >= duration {
            break;
        }
        tokio::time::sleep_until(due.into()).await;
        let number = sent;
        sent += 1;
        let Ok(place) = outstanding.clone().try_acquire_owned() else {
            dropped.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let (client, url, body) = (client.clone(), url.clone(), body.render(number));
        let (errors, sender) = (errors.clone(), sender.clone());
        tokio::spawn(async move {
            let _place = place;
            let answered = client
                .post(&url)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await;
            let ok = match answered {
                Ok(response) => response.status().is_success() && response.bytes().await.is_ok(),
                Err(_) => false,
            };
            if ok {
                let _ = sender.send(due.elapsed().as_secs_f64() * 1e3);
            } else {
                errors.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    drop(sender);
    let mut latencies = Vec::new();
    while let Some(latency) = receiver.recv().await {
        latencies.push(latency);
    }
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort_by(f64::total_cmp);
    let at = |q: f64| marquee_tests::quantile(&latencies, q);
    println!(
        "{{\"offered_per_second\": {rate}, \"sent\": {sent}, \"answered\": {}, \"errors\": {}, \"dropped\": {}, \"per_second\": {:.1}, \"p50_ms\": {:.3}, \"p99_ms\": {:.3}}}",
        latencies.len(),
        errors.load(Ordering::Relaxed),
        dropped.load(Ordering::Relaxed),
        latencies.len() as f64 / elapsed,
        at(0.5),
        at(0.99)
    );
    Ok(())
}
