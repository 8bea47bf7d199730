//! Streaming aggregates: features such as "bookings by this user in the last hour" or "failed
//! payments in 24 h", counted from domain events as they happen instead of materialised from
//! history. Events come from an [`EventSource`] (in process, or Kafka through `marquee-events`);
//! the [`Aggregator`] routes each event to the aggregates that count its kind, and the online
//! store keeps the counts, so every serving process reads the same numbers.

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::mpsc;

use crate::FeatureStoreError;
use crate::definitions::{Definitions, FeatureView};
use crate::online::{CountedEvent, OnlineStore, entity_key};

/// A domain event, as the booking core emits them.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// e.g. `booking.created`, `payment.failed`.
    pub kind: String,
    /// Join key -> id, e.g. `user_id` -> `u1`.
    pub entities: BTreeMap<String, String>,
    /// When it happened, in ms since the epoch.
    pub time_ms: i64,
}

/// Where events come from. `None` means the source is finished.
#[async_trait]
pub trait EventSource: Send {
    async fn next(&mut self) -> Option<Event>;

    /// Events already waiting, without waiting for more (to count them in one store call).
    fn ready(&mut self) -> Vec<Event>;

    /// Everything handed out so far is counted in the store: a source that keeps a position
    /// (Kafka's committed offsets) may move it past them now, and not before.
    fn counted(&mut self) {}
}

/// The in-process source: whatever holds a [`EventPublisher`] publishes, the aggregator counts.
pub struct ChannelSource {
    receiver: mpsc::Receiver<Event>,
}

/// The sending side of a [`ChannelSource`]; cheap to clone.
#[derive(Clone)]
pub struct EventPublisher {
    sender: mpsc::Sender<Event>,
}

/// A bounded in-process channel: `capacity` events may wait before publishers wait too.
pub fn channel(capacity: usize) -> (EventPublisher, ChannelSource) {
    let (sender, receiver) = mpsc::channel(capacity.max(1));
    (EventPublisher { sender }, ChannelSource { receiver })
}

impl EventPublisher {
    /// Hands an event to the aggregator; fails only when the aggregator has stopped.
    pub async fn publish(&self, event: Event) -> Result<(), FeatureStoreError> {
        self.sender
            .send(event)
            .await
            .map_err(|_| FeatureStoreError::Unavailable("the event aggregator has stopped".into()))
    }
}

#[async_trait]
impl EventSource for ChannelSource {
    async fn next(&mut self) -> Option<Event> {
        self.receiver.recv().await
    }

    fn ready(&mut self) -> Vec<Event> {
        let mut events = Vec::new();
        while events.len() < 1024
            && let Ok(event) = self.receiver.try_recv()
        {
            events.push(event);
        }
        events
    }
}

/// Routes events to the aggregates that count them.
pub struct Aggregator {
    /// Event kind -> (view, aggregate position) pairs that count it.
    routes: BTreeMap<String, Vec<(FeatureView, usize)>>,
    online: Arc<dyn OnlineStore>,
}

impl Aggregator {
    pub fn new(definitions: &Definitions, online: Arc<dyn OnlineStore>) -> Self {
        let mut routes: BTreeMap<String, Vec<(FeatureView, usize)>> = BTreeMap::new();
        for view in definitions.views() {
            for (position, aggregate) in view.aggregates() {
                routes
                    .entry(aggregate.event.clone())
                    .or_default()
                    .push((view.clone(), position));
            }
        }
        Self { routes, online }
    }

    /// Counts events until the source ends. A store failure loses that batch's counts (they
    /// are logged); the aggregator keeps going, as serving does without the store.
    pub async fn run(self, mut source: impl EventSource) {
        while let Some(first) = source.next().await {
            let mut events = vec![first];
            events.extend(source.ready());
            match self.count(&events).await {
                Ok(()) => source.counted(),
                Err(e) => tracing::warn!(error = %e, events = events.len(), "events not counted"),
            }
        }
    }

    /// Counts a batch of events: one store call per view.
    pub async fn count(&self, events: &[Event]) -> Result<(), FeatureStoreError> {
        let mut by_view: BTreeMap<&str, (&FeatureView, Vec<CountedEvent>)> = BTreeMap::new();
        for event in events {
            for (view, position) in self.routes.get(&event.kind).into_iter().flatten() {
                let Some(parts) = view
                    .join_keys
                    .iter()
                    .map(|k| event.entities.get(k).map(String::as_str))
                    .collect::<Option<Vec<&str>>>()
                else {
                    continue;
                };
                by_view
                    .entry(view.name.as_str())
                    .or_insert_with(|| (view, Vec::new()))
                    .1
                    .push(CountedEvent {
                        feature: *position,
                        entity_key: entity_key(&parts),
                        time_ms: event.time_ms,
                    });
            }
        }
        for (view, counted) in by_view.values() {
            self.online.record(view, counted).await?;
        }
        Ok(())
    }
}
