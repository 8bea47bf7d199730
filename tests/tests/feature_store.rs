//! The online stores against a real Redis (started on a loopback port by the test) and in
//! process: the same round trips (list and vector features included), newest-event-wins and TTL expiry on both; one round trip for a
//! whole request's lookups, counted on the wire; Redis killed mid-test fails fast and recovers.

use std::time::{Duration, Instant};

use marquee_feature_store::{
    Definitions, FeatureStoreError, FeatureValue, Lookup, MemoryStore, OnlineRow, OnlineStore,
    RedisConfig, RedisStore, entity_key,
};
use marquee_tests::{CountingProxy, RedisServer};

const DEFINITIONS: &str = r#"
[[entity]]
name = "user"

[[entity]]
name = "show"

[[feature_view]]
name = "user_activity"
entities = ["user"]
ttl = "1h"
feature = [
  { name = "bookings_1h", dtype = "int64" },
  { name = "avg_ticket_price", dtype = "float64", default = 12.5 },
  { name = "favourite_genre", dtype = "string", default = "drama" },
  { name = "is_member", dtype = "bool" },
  { name = "booked_movies", dtype = "list<string>", default = [] },
  { name = "taste", dtype = "list<float32>" },
]

[[feature_view]]
name = "show_demand"
entities = ["show"]
ttl = "3s"
feature = [{ name = "occupancy", dtype = "float32" }]
"#;

fn definitions() -> Definitions {
    Definitions::from_toml(DEFINITIONS).unwrap()
}

fn redis_store(url: &str) -> RedisStore {
    RedisStore::new(&RedisConfig {
        timeout_ms: 200,
        ..RedisConfig::new(url)
    })
    .unwrap()
}

fn activity(user: &str, bookings: i64, event_time_ms: i64) -> OnlineRow {
    OnlineRow {
        entity_key: entity_key(&[user]),
        values: vec![
            Some(FeatureValue::Int(bookings)),
            Some(FeatureValue::Float(bookings as f64 * 1.25)),
            Some(FeatureValue::String(format!("genre {user}"))),
            None,
            Some(FeatureValue::Strings(vec![
                "m1".into(),
                format!("m-{user}"),
            ])),
            Some(FeatureValue::Floats(vec![0.1, -2.5e-3, bookings as f32])),
        ],
        event_time_ms,
    }
}

async fn read_one(
    store: &dyn OnlineStore,
    definitions: &Definitions,
    view: &str,
    key: &str,
) -> Option<Vec<Option<FeatureValue>>> {
    let view = definitions.view(view).unwrap();
    store
        .read(&[Lookup {
            view,
            entity_key: key,
        }])
        .await
        .unwrap()
        .pop()
        .unwrap()
        .map(|row| row.values)
}

/// The behaviour both stores must share.
async fn round_trips(store: &dyn OnlineStore) {
    let definitions = definitions();
    let view = definitions.view("user_activity").unwrap();
    let now = marquee_feature_store::online::now_ms();
    store
        .write(
            view,
            &[activity("u1", 3, now - 1000), activity("u2", 5, now - 1000)],
        )
        .await
        .unwrap();
    assert_eq!(
        read_one(store, &definitions, "user_activity", "u1")
            .await
            .unwrap(),
        vec![
            Some(FeatureValue::Int(3)),
            Some(FeatureValue::Float(3.75)),
            Some(FeatureValue::String("genre u1".into())),
            None,
            Some(FeatureValue::Strings(vec!["m1".into(), "m-u1".into()])),
            Some(FeatureValue::Floats(vec![0.1, -2.5e-3, 3.0])),
        ],
        "values come back exactly (lists and vectors too); an unset feature is None"
    );
    assert_eq!(
        read_one(store, &definitions, "user_activity", "nobody").await,
        None
    );

    // An older event never replaces a newer one; a newer one replaces it whole.
    store
        .write(view, &[activity("u1", 99, now - 5000)])
        .await
        .unwrap();
    assert_eq!(
        read_one(store, &definitions, "user_activity", "u1")
            .await
            .unwrap()[0],
        Some(FeatureValue::Int(3))
    );
    store.write(view, &[activity("u1", 4, now)]).await.unwrap();
    assert_eq!(
        read_one(store, &definitions, "user_activity", "u1")
            .await
            .unwrap()[0],
        Some(FeatureValue::Int(4))
    );

    // Many views and entities in one call, answers in the order asked.
    let demand = definitions.view("show_demand").unwrap();
    store
        .write(
            demand,
            &[OnlineRow {
                entity_key: entity_key(&["s1"]),
                values: vec![Some(FeatureValue::Float(0.75))],
                event_time_ms: now,
            }],
        )
        .await
        .unwrap();
    let found = store
        .read(&[
            Lookup {
                view: demand,
                entity_key: "s1",
            },
            Lookup {
                view,
                entity_key: "u2",
            },
            Lookup {
                view,
                entity_key: "u3",
            },
        ])
        .await
        .unwrap();
    assert_eq!(
        found[0].as_ref().unwrap().values,
        vec![Some(FeatureValue::Float(0.75))]
    );
    assert_eq!(
        found[1].as_ref().unwrap().values[0],
        Some(FeatureValue::Int(5))
    );
    assert!(found[2].is_none());

    // TTL: show_demand lives 3 s after its event time.
    let expired = now - 4000;
    store
        .write(
            demand,
            &[
                OnlineRow {
                    entity_key: entity_key(&["s2"]),
                    values: vec![Some(FeatureValue::Float(0.5))],
                    event_time_ms: expired,
                },
                OnlineRow {
                    entity_key: entity_key(&["s3"]),
                    values: vec![Some(FeatureValue::Float(0.25))],
                    event_time_ms: marquee_feature_store::online::now_ms() - 2000,
                },
            ],
        )
        .await
        .unwrap();
    assert_eq!(
        read_one(store, &definitions, "show_demand", "s2").await,
        None,
        "a row already past its TTL is not stored"
    );
    assert!(
        read_one(store, &definitions, "show_demand", "s3")
            .await
            .is_some()
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        read_one(store, &definitions, "show_demand", "s3").await,
        None,
        "the row expired 3 s after its event time"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_in_process_store_round_trips_and_expires() {
    round_trips(&MemoryStore::new()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redis_store_round_trips_and_expires() {
    let redis = RedisServer::start().await;
    round_trips(&redis_store(&redis.url())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_for_100_entities_in_two_views_is_one_round_trip() {
    let redis = RedisServer::start().await;
    let proxy = CountingProxy::start(redis.port).await;
    let store = redis_store(&proxy.url());
    let definitions = definitions();
    let (activity_view, demand) = (
        definitions.view("user_activity").unwrap(),
        definitions.view("show_demand").unwrap(),
    );
    let now = marquee_feature_store::online::now_ms();
    let users: Vec<String> = (0..100).map(|i| format!("user-{i}")).collect();
    let rows: Vec<OnlineRow> = users
        .iter()
        .enumerate()
        .map(|(i, u)| activity(u, i as i64, now))
        .collect();
    store.write(activity_view, &rows).await.unwrap();

    let mut lookups: Vec<Lookup> = users
        .iter()
        .map(|u| Lookup {
            view: activity_view,
            entity_key: u,
        })
        .collect();
    lookups.extend(users.iter().map(|u| Lookup {
        view: demand,
        entity_key: u,
    }));
    // Warm the connection, then count one lookup on the wire.
    store.read(&lookups).await.unwrap();
    let before = proxy.client_reads();
    let found = store.read(&lookups).await.unwrap();
    let trips = proxy.client_reads() - before;
    assert_eq!(trips, 1, "200 lookups went out as {trips} writes");
    assert_eq!(found.len(), 200);
    assert!(found[..100].iter().all(Option::is_some));
    assert!(found[100..].iter().all(Option::is_none));
    assert_eq!(
        found[42].as_ref().unwrap().values[0],
        Some(FeatureValue::Int(42))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_redis_fails_fast_and_the_store_recovers_when_it_returns() {
    let mut redis = RedisServer::start().await;
    let store = redis_store(&redis.url());
    let definitions = definitions();
    let view = definitions.view("user_activity").unwrap();
    let now = marquee_feature_store::online::now_ms();
    store.write(view, &[activity("u1", 1, now)]).await.unwrap();
    assert!(
        read_one(&store, &definitions, "user_activity", "u1")
            .await
            .is_some()
    );

    redis.kill();
    for _ in 0..20 {
        let started = Instant::now();
        let result = store
            .read(&[Lookup {
                view,
                entity_key: "u1",
            }])
            .await;
        assert!(
            matches!(result, Err(FeatureStoreError::Unavailable(_))),
            "{result:?}"
        );
        assert!(
            started.elapsed() < Duration::from_millis(1000),
            "a lookup with Redis down took {:?}",
            started.elapsed()
        );
    }

    redis.restart().await;
    let started = Instant::now();
    loop {
        match store.write(view, &[activity("u1", 2, now)]).await {
            Ok(()) => break,
            Err(e) => assert!(
                started.elapsed() < Duration::from_secs(10),
                "the store never came back: {e}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        read_one(&store, &definitions, "user_activity", "u1")
            .await
            .unwrap()[0],
        Some(FeatureValue::Int(2))
    );
}

const COUNTERS: &str = r#"
[[entity]]
name = "user"

[[feature_view]]
name = "user_counters"
entities = ["user"]
ttl = "1day"
feature = [
  { name = "bookings_1h", dtype = "int64", aggregate = { event = "booking.created", window = "1h" } },
  { name = "failed_payments_24h", dtype = "int64", aggregate = { event = "payment.failed", window = "24h" } },
]
"#;

/// Streaming aggregates on either store: events published in process, counted per entity in
/// their sliding windows, read back like any feature.
async fn streaming_counts(store: std::sync::Arc<dyn OnlineStore>) {
    use marquee_feature_store::{Aggregator, Event};
    let definitions = Definitions::from_toml(COUNTERS).unwrap();
    let (publisher, source) = marquee_feature_store::aggregates::channel(64);
    let aggregator = tokio::spawn(Aggregator::new(&definitions, store.clone()).run(source));
    let now = marquee_feature_store::online::now_ms();
    let minute = 60_000;
    let event = |kind: &str, user: Option<&str>, ago: i64| Event {
        kind: kind.into(),
        entities: user
            .map(|u| ("user_id".to_string(), u.to_string()))
            .into_iter()
            .collect(),
        time_ms: now - ago,
    };
    for e in [
        event("booking.created", Some("u1"), 10 * minute),
        event("booking.created", Some("u1"), 20 * minute),
        event("booking.created", Some("u1"), 120 * minute), // outside the hour
        event("payment.failed", Some("u1"), 300 * minute),
        event("booking.created", Some("u2"), minute),
        event("seat.held", Some("u1"), minute), // nobody counts this kind
        event("booking.created", None, minute), // no user: not countable
    ] {
        publisher.publish(e).await.unwrap();
    }
    let view = definitions.view("user_counters").unwrap();
    let started = Instant::now();
    let counts = loop {
        let found = store
            .read(&[
                Lookup {
                    view,
                    entity_key: "u1",
                },
                Lookup {
                    view,
                    entity_key: "u2",
                },
                Lookup {
                    view,
                    entity_key: "u3",
                },
            ])
            .await
            .unwrap();
        let counts: Vec<Vec<Option<FeatureValue>>> = found
            .into_iter()
            .map(|row| row.expect("a view of aggregates always answers").values)
            .collect();
        if counts[1][0] == Some(FeatureValue::Int(1)) {
            break counts;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "events never counted: {counts:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let int = |v: i64| Some(FeatureValue::Int(v));
    assert_eq!(
        counts[0],
        vec![int(2), int(1)],
        "u1: two bookings in the hour, one failure in 24 h"
    );
    assert_eq!(counts[1], vec![int(1), int(0)]);
    assert_eq!(
        counts[2],
        vec![int(0), int(0)],
        "an entity without events counts zero"
    );
    drop(publisher);
    aggregator.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_aggregates_count_events_in_their_windows_in_process() {
    streaming_counts(std::sync::Arc::new(MemoryStore::new())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_aggregates_count_events_in_their_windows_on_redis() {
    let redis = RedisServer::start().await;
    streaming_counts(std::sync::Arc::new(redis_store(&redis.url()))).await;
}
