//! The features the hosted models read, as the feature pipelines would have written them while the
//! world happened: one history row each time a value changed, stamped a second after the event
//! that changed it (pipelines lag their events, and a training set joined at an event's own time
//! must not see that event). The same definitions serve `/v1/predict` online and build training
//! sets offline (`marquee features dataset`), so training reads exactly what serving will.

use super::{DAY_MS, HOUR_MS, PaymentStatus, World};

/// How long after an event its features are written.
pub const PIPELINE_LAG_MS: i64 = 1_000;

/// Hours between a show's demand snapshots, and how many it gets before it starts.
pub const SNAPSHOT_HOURS: i64 = 3;
pub const SNAPSHOTS: i64 = 24;

/// The definitions of what [`histories`] writes, with offline sources relative to the data folder.
pub const DEFINITIONS: &str = r#"# Written by `marquee data generate`: the movie-ticket platform's features and where their
# history lives (beside this file). `marquee features apply --definitions features.toml` checks it.

[[entity]]
name = "user"
description = "A ticket buyer"

[[entity]]
name = "show"
description = "One screening of a film"

[[entity]]
name = "movie"
description = "A film in the catalogue"

[[feature_view]]
name = "user_activity"
entities = ["user"]
ttl = "7days"
source = { path = "features/user_activity.parquet", timestamp_column = "event_time" }
feature = [
  { name = "bookings_7d", dtype = "int64", default = 0 },
  { name = "avg_ticket_price", dtype = "float64", default = 11.0 },
]

[[feature_view]]
name = "user_risk"
entities = ["user"]
ttl = "1day"
source = { path = "features/user_risk.parquet", timestamp_column = "event_time" }
feature = [
  { name = "booking_velocity_1h", dtype = "int64", default = 0 },
  { name = "failed_payments_24h", dtype = "int64", default = 0 },
  { name = "account_age_days", dtype = "float64", default = 365.0 },
]

[[feature_view]]
name = "show_demand"
entities = ["show"]
ttl = "3h"
source = { path = "features/show_demand.parquet", timestamp_column = "event_time" }
feature = [
  { name = "occupancy", dtype = "float32", default = 0.0 },
  { name = "popularity", dtype = "float32", default = 0.5 },
  { name = "historical_demand", dtype = "float32", default = 0.0 },
]

[[feature_view]]
name = "movie_stats"
entities = ["movie"]
ttl = "2days"
source = { path = "features/movie_stats.parquet", timestamp_column = "event_time" }
feature = [
  { name = "movie_bookings_7d", dtype = "int64", default = 0 },
]
"#;

/// One feature view's history: the entity id, the time, and one column per feature.
pub struct History {
    pub view: &'static str,
    pub key_column: &'static str,
    pub keys: Vec<String>,
    pub times_ms: Vec<i64>,
    pub columns: Vec<(&'static str, Column)>,
}

pub enum Column {
    Int64(Vec<i64>),
    Float64(Vec<f64>),
    Float32(Vec<f32>),
}

/// Events of one entity in time order, for counting those in a window ending at a moment.
#[derive(Default)]
struct Timeline {
    times: Vec<i64>,
}

impl Timeline {
    /// How many events fall in (`at - window`, `at`].
    fn count(&self, at: i64, window: i64) -> i64 {
        let end = self.times.partition_point(|&t| t <= at);
        let start = self.times.partition_point(|&t| t <= at - window);
        (end - start) as i64
    }
}

pub fn histories(world: &World) -> Vec<History> {
    vec![
        user_activity(world),
        user_risk(world),
        show_demand(world),
        movie_stats(world),
    ]
}

fn user_activity(world: &World) -> History {
    let mut timelines: Vec<Timeline> = (0..world.users.len())
        .map(|_| Timeline::default())
        .collect();
    let mut spent = vec![(0.0, 0u32); world.users.len()];
    let (mut keys, mut times, mut counts, mut prices) = (vec![], vec![], vec![], vec![]);
    for booking in &world.bookings {
        let user = booking.user;
        timelines[user].times.push(booking.booked_ms);
        let (sum, n) = &mut spent[user];
        *sum += booking.unit_price;
        *n += 1;
        keys.push(world.users[user].id.clone());
        times.push(booking.booked_ms + PIPELINE_LAG_MS);
        counts.push(timelines[user].count(booking.booked_ms, 7 * DAY_MS));
        prices.push(*sum / *n as f64);
    }
    History {
        view: "user_activity",
        key_column: "user_id",
        keys,
        times_ms: times,
        columns: vec![
            ("bookings_7d", Column::Int64(counts)),
            ("avg_ticket_price", Column::Float64(prices)),
        ],
    }
}

fn user_risk(world: &World) -> History {
    let users = world.users.len();
    let mut bookings: Vec<Timeline> = (0..users).map(|_| Timeline::default()).collect();
    let mut failures: Vec<Timeline> = (0..users).map(|_| Timeline::default()).collect();
    // Every moment a user's risk changes: each booking and each declined payment.
    let mut events: Vec<(i64, usize)> = Vec::with_capacity(world.bookings.len());
    for booking in &world.bookings {
        bookings[booking.user].times.push(booking.booked_ms);
        events.push((booking.booked_ms, booking.user));
    }
    for payment in &world.payments {
        if payment.status == PaymentStatus::Failed {
            let user = world.bookings[payment.booking].user;
            failures[user].times.push(payment.at_ms);
            events.push((payment.at_ms, user));
        }
    }
    failures.iter_mut().for_each(|t| t.times.sort_unstable());
    events.sort_unstable();
    let (mut keys, mut times, mut velocity, mut failed, mut age) =
        (vec![], vec![], vec![], vec![], vec![]);
    for (at, user) in events {
        keys.push(world.users[user].id.clone());
        times.push(at + PIPELINE_LAG_MS);
        velocity.push(bookings[user].count(at, HOUR_MS));
        failed.push(failures[user].count(at, DAY_MS));
        age.push(((at - world.users[user].signup_ms) as f64 / DAY_MS as f64).max(0.0));
    }
    History {
        view: "user_risk",
        key_column: "user_id",
        keys,
        times_ms: times,
        columns: vec![
            ("booking_velocity_1h", Column::Int64(velocity)),
            ("failed_payments_24h", Column::Int64(failed)),
            ("account_age_days", Column::Float64(age)),
        ],
    }
}

fn show_demand(world: &World) -> History {
    // Seats sold per show, in booking-time order.
    let mut sales: Vec<Vec<(i64, u32)>> = vec![Vec::new(); world.shows.len()];
    for booking in &world.bookings {
        sales[booking.show].push((booking.booked_ms, booking.seats));
    }
    let (mut keys, mut times, mut occupancy, mut popularity, mut recent) =
        (vec![], vec![], vec![], vec![], vec![]);
    for (show, sold) in world.shows.iter().zip(&sales) {
        let mut cumulative = Vec::with_capacity(sold.len());
        let mut total = 0u32;
        for &(_, seats) in sold {
            total += seats;
            cumulative.push(total);
        }
        let sold_by = |at: i64| -> u32 {
            match sold.partition_point(|&(t, _)| t <= at) {
                0 => 0,
                n => cumulative[n - 1],
            }
        };
        let capacity = show.capacity.max(1) as f32;
        for k in (1..=SNAPSHOTS).rev() {
            let at = show.starts_ms - k * SNAPSHOT_HOURS * HOUR_MS;
            keys.push(show.id.clone());
            times.push(at);
            occupancy.push(sold_by(at) as f32 / capacity);
            popularity.push(show.demand.popularity as f32);
            recent.push((sold_by(at) - sold_by(at - DAY_MS)) as f32 / capacity);
        }
    }
    History {
        view: "show_demand",
        key_column: "show_id",
        keys,
        times_ms: times,
        columns: vec![
            ("occupancy", Column::Float32(occupancy)),
            ("popularity", Column::Float32(popularity)),
            ("historical_demand", Column::Float32(recent)),
        ],
    }
}

fn movie_stats(world: &World) -> History {
    let mut timelines: Vec<Timeline> = (0..world.movies.len())
        .map(|_| Timeline::default())
        .collect();
    for booking in &world.bookings {
        timelines[world.shows[booking.show].movie]
            .times
            .push(booking.booked_ms);
    }
    let (mut keys, mut times, mut counts) = (vec![], vec![], vec![]);
    let first_day = world
        .bookings
        .first()
        .map_or(super::START_MS, |b| b.booked_ms)
        .div_euclid(DAY_MS);
    let last_day = world.end_ms().div_euclid(DAY_MS);
    for day in first_day..=last_day {
        let at = day * DAY_MS;
        for (movie, timeline) in world.movies.iter().zip(&timelines) {
            let count = timeline.count(at, 7 * DAY_MS);
            if count > 0 {
                keys.push(movie.id.clone());
                times.push(at);
                counts.push(count);
            }
        }
    }
    History {
        view: "movie_stats",
        key_column: "movie_id",
        keys,
        times_ms: times,
        columns: vec![("movie_bookings_7d", Column::Int64(counts))],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_timeline_counts_the_half_open_window() {
        let timeline = Timeline {
            times: vec![10, 20, 30, 40],
        };
        assert_eq!(timeline.count(30, 20), 2);
        assert_eq!(timeline.count(40, 100), 4);
        assert_eq!(timeline.count(5, 10), 0);
    }

    #[test]
    fn the_definitions_parse() {
        let definitions = marquee_feature_store::Definitions::from_toml(DEFINITIONS).unwrap();
        assert_eq!(definitions.views().count(), 4);
    }
}
