//! Times online lookups the way `/v1/predict` makes them (one read of N entities of a view with F
//! features, one round trip) against a running Redis, for bench/features.py, which sets Feast's
//! retrieval beside it. Prints one JSON object: the latencies' median and p99 in microseconds.
//!
//!     cargo run --release -p marquee-feature-store --example lookup_bench -- redis://127.0.0.1:6379/ 100 20 2000

use std::time::Instant;

use marquee_feature_store::{
    Definitions, FeatureValue, Lookup, OnlineRow, OnlineStore, RedisConfig, RedisStore, entity_key,
};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let url = args
        .get(1)
        .map_or("redis://127.0.0.1:6379/", String::as_str);
    let entities: usize = args.get(2).map_or(Ok(100), |a| a.parse())?;
    let features: usize = args.get(3).map_or(Ok(20), |a| a.parse())?;
    let repeats: usize = args.get(4).map_or(Ok(2000), |a| a.parse())?;

    let feature_list: Vec<String> = (0..features)
        .map(|i| format!("{{ name = \"f{i}\", dtype = \"float32\" }}"))
        .collect();
    let definitions = Definitions::from_toml(&format!(
        "[[entity]]\nname = \"user\"\n[[feature_view]]\nname = \"bench\"\nentities = [\"user\"]\nttl = \"1day\"\nfeature = [{}]\n",
        feature_list.join(", ")
    ))?;
    let view = definitions.view("bench")?;
    let store = RedisStore::new(&RedisConfig {
        timeout_ms: 1000,
        ..RedisConfig::new(url)
    })?;
    let keys: Vec<String> = (0..entities)
        .map(|i| entity_key(&[format!("user-{i}")]))
        .collect();
    let now = marquee_feature_store::online::now_ms();
    let rows: Vec<OnlineRow> = keys
        .iter()
        .enumerate()
        .map(|(i, key)| OnlineRow {
            entity_key: key.clone(),
            values: (0..features)
                .map(|f| Some(FeatureValue::Float((i * features + f) as f32 as f64 / 7.0)))
                .collect(),
            event_time_ms: now,
        })
        .collect();
    store.write(view, &rows).await?;
    let lookups: Vec<Lookup> = keys
        .iter()
        .map(|key| Lookup {
            view,
            entity_key: key,
        })
        .collect();
    for _ in 0..repeats / 10 {
        store.read(&lookups).await?;
    }
    let mut micros = Vec::with_capacity(repeats);
    for _ in 0..repeats {
        let started = Instant::now();
        let found = store.read(&lookups).await?;
        micros.push(started.elapsed().as_secs_f64() * 1e6);
        assert!(found.iter().all(Option::is_some), "every entity is found");
    }
    micros.sort_by(f64::total_cmp);
    let at = |q: f64| micros[((micros.len() as f64 * q) as usize).min(micros.len() - 1)];
    println!(
        "{{\"entities\": {entities}, \"features\": {features}, \"repeats\": {repeats}, \"median_us\": {:.1}, \"p99_us\": {:.1}}}",
        at(0.5),
        at(0.99)
    );
    Ok(())
}
