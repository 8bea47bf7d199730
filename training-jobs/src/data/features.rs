//! The features the hosted models read, as the feature pipelines would have written them while the
//! world happened: one history row each time a value changed, stamped a second after the event
//! that changed it (pipelines lag their events, and a training set joined at an event's own time
//! must not see that event). A windowed count changes twice per event, when the event enters its
//! window and when it leaves, so both get a row: a value read between events is never stale. The same definitions serve `/v1/predict` online and build training
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
]

# Days since signup, capped: a young account gets a fresh value every few hours, an account past
# the cap gets none and reads the default (the cap).
[[feature_view]]
name = "user_account"
entities = ["user"]
ttl = "2days"
source = { path = "features/user_account.parquet", timestamp_column = "event_time" }
feature = [
  { name = "account_age_days", dtype = "float64", default = 30.0 },
]

[[feature_view]]
name = "show_demand"
entities = ["show"]
ttl = "3h"
source = { path = "features/show_demand.parquet", timestamp_column = "event_time" }
feature = [
  { name = "occupancy", dtype = "float32", default = 0.0 },
  { name = "popularity", dtype = "float32", default = 0.5 },
  # The share of seats sold in the last 24 hours.
  { name = "sales_24h", dtype = "float32", default = 0.0 },
]

# What a user booked so far, for recommendations: the movies (distinct, oldest first, the last
# 50) and the share of them in each genre (the genres of `marquee data generate`, in order). A
# history does not go stale as a counter does: it is kept for ten years.
[[feature_view]]
name = "user_history"
entities = ["user"]
ttl = "3650days"
source = { path = "features/user_history.parquet", timestamp_column = "event_time" }
feature = [
  { name = "booked_movies", dtype = "list<string>", default = [] },
  { name = "genre_shares", dtype = "list<float32>", default = [] },
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
    StringLists(Vec<Vec<String>>),
    Float32Lists(Vec<Vec<f32>>),
}

/// The most movies `booked_movies` holds: the latest ones.
pub const HISTORY_LENGTH: usize = 50;

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

/// The cap of `account_age_days`: older accounts all read it.
pub const ACCOUNT_AGE_CAP_DAYS: i64 = 30;

pub fn histories(world: &World) -> Vec<History> {
    vec![
        user_activity(world),
        user_risk(world),
        user_account(world),
        show_demand(world),
        user_history(world),
        movie_stats(world),
    ]
}

/// A row each time a user books a movie they had not booked before.
fn user_history(world: &World) -> History {
    let genres = super::catalog::GENRES.len();
    let mut booked: Vec<Vec<usize>> = vec![Vec::new(); world.users.len()];
    let mut counts: Vec<Vec<u32>> = vec![vec![0; genres]; world.users.len()];
    let (mut keys, mut times, mut movies, mut shares) = (vec![], vec![], vec![], vec![]);
    for booking in &world.bookings {
        let movie = world.shows[booking.show].movie;
        let user = booking.user;
        if booked[user].contains(&movie) {
            continue;
        }
        booked[user].push(movie);
        counts[user][world.movies[movie].genres[0]] += 1;
        let total = booked[user].len() as f32;
        let recent = &booked[user][booked[user].len().saturating_sub(HISTORY_LENGTH)..];
        keys.push(world.users[user].id.clone());
        times.push(booking.booked_ms + PIPELINE_LAG_MS);
        movies.push(recent.iter().map(|&m| world.movies[m].id.clone()).collect());
        shares.push(counts[user].iter().map(|&c| c as f32 / total).collect());
    }
    History {
        view: "user_history",
        key_column: "user_id",
        keys,
        times_ms: times,
        columns: vec![
            ("booked_movies", Column::StringLists(movies)),
            ("genre_shares", Column::Float32Lists(shares)),
        ],
    }
}

fn user_activity(world: &World) -> History {
    let mut timelines: Vec<Timeline> = (0..world.users.len())
        .map(|_| Timeline::default())
        .collect();
    // Each booking enters the 7-day count (and the average price) and later leaves the count;
    // a booking sorts before a departure at the same moment, and one row per user and moment.
    let mut events: Vec<(i64, usize, Option<f64>)> = Vec::with_capacity(2 * world.bookings.len());
    for booking in &world.bookings {
        timelines[booking.user].times.push(booking.booked_ms);
        events.push((booking.booked_ms, booking.user, Some(booking.unit_price)));
        events.push((booking.booked_ms + 7 * DAY_MS, booking.user, None));
    }
    events.sort_by_key(|e| (e.0, e.1, e.2.is_none()));
    let mut spent = vec![(0.0, 0u32); world.users.len()];
    let (mut keys, mut times, mut counts, mut prices) = (vec![], vec![], vec![], vec![]);
    let mut last: Option<(i64, usize)> = None;
    for (at, user, price) in events {
        let (sum, n) = &mut spent[user];
        if let Some(price) = price {
            *sum += price;
            *n += 1;
        }
        if last == Some((at, user)) {
            continue;
        }
        last = Some((at, user));
        keys.push(world.users[user].id.clone());
        times.push(at + PIPELINE_LAG_MS);
        counts.push(timelines[user].count(at, 7 * DAY_MS));
        prices.push(*sum / f64::from((*n).max(1)));
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
    // Every moment a user's risk changes: each booking and each declined payment, and the moment
    // each leaves its window.
    let mut events: Vec<(i64, usize)> = Vec::with_capacity(2 * world.bookings.len());
    for booking in &world.bookings {
        bookings[booking.user].times.push(booking.booked_ms);
        events.push((booking.booked_ms, booking.user));
        events.push((booking.booked_ms + HOUR_MS, booking.user));
    }
    for payment in &world.payments {
        if payment.status == PaymentStatus::Failed {
            let user = world.bookings[payment.booking].user;
            failures[user].times.push(payment.at_ms);
            events.push((payment.at_ms, user));
            events.push((payment.at_ms + DAY_MS, user));
        }
    }
    failures.iter_mut().for_each(|t| t.times.sort_unstable());
    events.sort_unstable();
    events.dedup();
    let (mut keys, mut times, mut velocity, mut failed) = (vec![], vec![], vec![], vec![]);
    for (at, user) in events {
        keys.push(world.users[user].id.clone());
        times.push(at + PIPELINE_LAG_MS);
        velocity.push(bookings[user].count(at, HOUR_MS));
        failed.push(failures[user].count(at, DAY_MS));
    }
    History {
        view: "user_risk",
        key_column: "user_id",
        keys,
        times_ms: times,
        columns: vec![
            ("booking_velocity_1h", Column::Int64(velocity)),
            ("failed_payments_24h", Column::Int64(failed)),
        ],
    }
}

/// Account age for accounts younger than the cap: at signup, every 6 hours for the first two
/// days (when age tells most), then daily.
fn user_account(world: &World) -> History {
    let steps_ms: Vec<i64> = (0..8)
        .map(|k| k * 6 * HOUR_MS)
        .chain((3..=ACCOUNT_AGE_CAP_DAYS).map(|d| d * DAY_MS))
        .collect();
    let mut rows: Vec<(i64, usize, f64)> = Vec::new();
    for (u, user) in world.users.iter().enumerate() {
        for &step in &steps_ms {
            let at = user.signup_ms + step;
            if at > world.end_ms() {
                break;
            }
            if at + ACCOUNT_AGE_CAP_DAYS * DAY_MS < super::START_MS {
                continue;
            }
            rows.push((at, u, step as f64 / DAY_MS as f64));
        }
    }
    rows.sort_by_key(|r| (r.0, r.1));
    History {
        view: "user_account",
        key_column: "user_id",
        keys: rows.iter().map(|r| world.users[r.1].id.clone()).collect(),
        times_ms: rows.iter().map(|r| r.0 + PIPELINE_LAG_MS).collect(),
        columns: vec![(
            "account_age_days",
            Column::Float64(rows.iter().map(|r| r.2).collect()),
        )],
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
            times.push(at + PIPELINE_LAG_MS);
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
            ("sales_24h", Column::Float32(recent)),
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
                times.push(at + PIPELINE_LAG_MS);
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
    fn a_users_history_lists_each_movie_once_with_genre_shares() {
        let world = World::generate(super::super::Scale::Small, 4, &mut |_| {});
        let history = user_history(&world);
        let (Column::StringLists(movies), Column::Float32Lists(shares)) =
            (&history.columns[0].1, &history.columns[1].1)
        else {
            panic!("booked_movies and genre_shares, in that order");
        };
        let mut latest: std::collections::HashMap<&str, usize> = Default::default();
        for (row, key) in history.keys.iter().enumerate() {
            latest.insert(key, row);
        }
        let mut seen: std::collections::HashMap<&str, Vec<&str>> = Default::default();
        for booking in &world.bookings {
            let user = world.users[booking.user].id.as_str();
            let movie = world.movies[world.shows[booking.show].movie].id.as_str();
            let list = seen.entry(user).or_default();
            if !list.contains(&movie) {
                list.push(movie);
            }
        }
        assert_eq!(latest.len(), seen.len());
        for (user, row) in latest {
            let all = &seen[user];
            let recent = &all[all.len().saturating_sub(HISTORY_LENGTH)..];
            assert_eq!(
                movies[row],
                recent.iter().map(|m| m.to_string()).collect::<Vec<_>>()
            );
            let total: f32 = shares[row].iter().sum();
            assert!((total - 1.0).abs() < 1e-5, "{user}: shares sum to {total}");
            assert_eq!(shares[row].len(), super::super::catalog::GENRES.len());
        }
        assert!(history.times_ms.windows(2).all(|w| w[0] <= w[1]));
    }

    #[test]
    fn the_definitions_parse() {
        let definitions = marquee_feature_store::Definitions::from_toml(DEFINITIONS).unwrap();
        assert_eq!(definitions.views().count(), 6);
    }
}
