//! The movie-ticket platform's world, generated: users with tastes and homes, a catalogue with
//! descriptions, theaters and their shows, and what happened at them (bookings, payments, fraud).
//! The hosted models learn from it and are judged on it, so it carries what real data would not
//! hand over: the demand curve every show was sold under (`market::expected_occupancy`, which the
//! pricing evaluation simulates against) and which bookings were fraud (kept in their own table,
//! never beside the features). Everything follows from the seed: one seed, one world.

pub mod catalog;
pub mod features;
pub mod fraud;
pub mod market;
pub mod write;

use std::fmt;

use rand::{RngExt, SeedableRng};
use rand_distr::{Distribution, Normal};

/// The generator's random source: PCG, whose output is fixed by its specification, so a seed
/// gives the same world on every machine and every version of this crate's dependencies.
pub type Rng = rand_pcg::Pcg64Mcg;

/// The first day of every generated world (a Monday), midnight UTC, in ms since the epoch.
pub const START_MS: i64 = 1_767_571_200_000;
pub const HOUR_MS: i64 = 3_600_000;
pub const DAY_MS: i64 = 24 * HOUR_MS;

/// How big a world to make.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scale {
    /// Seconds to make: for tests.
    Small,
    /// The quick start's.
    Medium,
    /// Benchmarks: about 100k users, 5k movies, 5M bookings.
    Large,
}

impl Scale {
    pub fn size(self) -> Size {
        match self {
            Scale::Small => Size {
                users: 6_000,
                movies: 150,
                theaters: 3,
                days: 14,
            },
            Scale::Medium => Size {
                users: 30_000,
                movies: 1_000,
                theaters: 8,
                days: 42,
            },
            Scale::Large => Size {
                users: 100_000,
                movies: 5_000,
                theaters: 80,
                days: 120,
            },
        }
    }
}

impl fmt::Display for Scale {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Scale::Small => "small",
            Scale::Medium => "medium",
            Scale::Large => "large",
        })
    }
}

/// The counts a scale stands for; bookings follow from shows and demand.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Size {
    pub users: usize,
    pub movies: usize,
    pub theaters: usize,
    /// Days of shows simulated, from [`START_MS`].
    pub days: usize,
}

pub struct User {
    pub id: String,
    pub city: usize,
    pub home_lat: f64,
    pub home_lon: f64,
    pub signup_ms: i64,
    /// Weights over [`catalog::GENRES`], summing to 1.
    pub taste: [f64; catalog::GENRES.len()],
    /// How often they go to the movies, relative to others (mean 1).
    pub activity: f64,
    pub devices: Vec<String>,
    pub cards: Vec<String>,
}

pub struct Movie {
    pub id: String,
    pub title: String,
    pub description: String,
    /// Indices into [`catalog::GENRES`]; the first is the primary genre.
    pub genres: Vec<usize>,
    pub release_ms: i64,
    /// Latent appeal (log-normal, median 1): what demand and bookings respond to.
    pub appeal: f64,
    pub runtime_minutes: u32,
}

pub struct Theater {
    pub id: String,
    pub name: String,
    pub city: usize,
    pub lat: f64,
    pub lon: f64,
    /// Seats per screen.
    pub screens: Vec<u32>,
    /// The theater's usual ticket price before time-of-week adjustments.
    pub list_price: f64,
}

pub struct Show {
    pub id: String,
    pub movie: usize,
    pub theater: usize,
    pub screen: usize,
    pub capacity: u32,
    pub starts_ms: i64,
    /// The price the rule table starts from.
    pub base_price: f64,
    /// What the show was sold at, as a multiple of `base_price` (the logging policy explored).
    pub multiplier: f64,
    /// What demand the show met, the input of the demand curve.
    pub demand: market::ShowDemand,
    pub seats_sold: u32,
}

pub struct Booking {
    pub id: String,
    pub user: usize,
    pub show: usize,
    pub seats: u32,
    pub unit_price: f64,
    pub booked_ms: i64,
    pub device: String,
    pub lat: f64,
    pub lon: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PaymentStatus {
    Succeeded,
    Failed,
}

impl PaymentStatus {
    pub fn name(self) -> &'static str {
        match self {
            PaymentStatus::Succeeded => "succeeded",
            PaymentStatus::Failed => "failed",
        }
    }
}

pub struct Payment {
    pub id: String,
    /// The booking it paid for; a failed attempt that was never retried still names the booking
    /// it tried to pay.
    pub booking: usize,
    pub card: String,
    pub amount: f64,
    pub status: PaymentStatus,
    pub at_ms: i64,
}

/// Which injected pattern a fraudulent booking follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FraudPattern {
    /// A taken-over account books many shows within the hour.
    VelocityBurst,
    /// A new account tries stolen cards until one passes.
    CardTesting,
    /// A booking from a device far from the user's home.
    FarDevice,
    /// Large bookings in the small hours by young accounts.
    OddHours,
}

impl FraudPattern {
    pub fn name(self) -> &'static str {
        match self {
            FraudPattern::VelocityBurst => "velocity_burst",
            FraudPattern::CardTesting => "card_testing",
            FraudPattern::FarDevice => "far_device",
            FraudPattern::OddHours => "odd_hours",
        }
    }
}

/// A movie-search query and the movie it describes.
pub struct SearchQuery {
    pub query: String,
    pub movie: usize,
}

/// A whole generated world.
pub struct World {
    pub scale: Scale,
    pub seed: u64,
    pub users: Vec<User>,
    pub movies: Vec<Movie>,
    pub theaters: Vec<Theater>,
    pub shows: Vec<Show>,
    /// In booking time order.
    pub bookings: Vec<Booking>,
    pub payments: Vec<Payment>,
    /// Per booking: `Some` for injected fraud.
    pub fraud: Vec<Option<FraudPattern>>,
    pub queries: Vec<SearchQuery>,
}

impl World {
    /// Generates the world of `scale` from `seed`; `progress` hears each stage's name.
    pub fn generate(scale: Scale, seed: u64, progress: &mut dyn FnMut(&str)) -> World {
        let mut rng = Rng::seed_from_u64(seed);
        let size = scale.size();
        progress("users and catalogue");
        let users = market::users(&mut rng, size);
        let (movies, texts) = market::movies(&mut rng, size);
        let theaters = market::theaters(&mut rng, size);
        let queries = texts
            .iter()
            .enumerate()
            .filter(|(i, _)| i % 2 == 0)
            .map(|(movie, text)| SearchQuery {
                query: catalog::query_for(&mut rng, text),
                movie,
            })
            .collect();
        progress("shows and demand");
        let shows = market::shows(&mut rng, size, &movies, &theaters);
        progress("bookings and payments");
        let mut world = World {
            scale,
            seed,
            users,
            movies,
            theaters,
            shows,
            bookings: Vec::new(),
            payments: Vec::new(),
            fraud: Vec::new(),
            queries,
        };
        market::sell(&mut rng, &mut world);
        progress("fraud");
        fraud::inject(&mut rng, &mut world);
        world.sort_bookings();
        world.number();
        world
    }

    /// Gives users, bookings and payments their ids in the order a live system would have
    /// issued them (signup, booking and payment time), so an id says nothing about how the
    /// record was made: fraud injected last must not carry the highest numbers.
    fn number(&mut self) {
        let mut by_signup: Vec<usize> = (0..self.users.len()).collect();
        by_signup.sort_by_key(|&i| (self.users[i].signup_ms, i));
        for (rank, &user) in by_signup.iter().enumerate() {
            self.users[user].id = format!("u{rank}");
        }
        for (i, booking) in self.bookings.iter_mut().enumerate() {
            booking.id = format!("b{i}");
        }
        for (i, payment) in self.payments.iter_mut().enumerate() {
            payment.id = format!("p{i}");
        }
    }

    /// Puts bookings in time order, keeping payments and fraud labels with their bookings.
    fn sort_bookings(&mut self) {
        let mut order: Vec<usize> = (0..self.bookings.len()).collect();
        order.sort_by_key(|&i| (self.bookings[i].booked_ms, i));
        let mut position = vec![0; order.len()];
        for (new, &old) in order.iter().enumerate() {
            position[old] = new;
        }
        let mut bookings: Vec<Option<Booking>> = self.bookings.drain(..).map(Some).collect();
        self.bookings = order.iter().filter_map(|&i| bookings[i].take()).collect();
        self.fraud = order.iter().map(|&i| self.fraud[i]).collect();
        for payment in &mut self.payments {
            payment.booking = position[payment.booking];
        }
        self.payments.sort_by_key(|p| (p.at_ms, p.booking));
    }

    /// The last moment anything happens: the end of the last show day.
    pub fn end_ms(&self) -> i64 {
        START_MS + self.scale.size().days as i64 * DAY_MS
    }
}

/// A fresh opaque identifier (`prefix-` and 40 random bits in hex), as devices and cards get
/// from the outside world: nothing in it tells whose it is or how it was made.
pub fn token(rng: &mut Rng, prefix: &str) -> String {
    format!("{prefix}-{:010x}", rng.random::<u64>() >> 24)
}

/// A point scattered around (`lat`, `lon`) by `sd` degrees: where someone is when they book.
pub fn around(rng: &mut Rng, (lat, lon): (f64, f64), sd: f64) -> (f64, f64) {
    let scatter = Normal::new(0.0, sd).expect("valid normal");
    (lat + scatter.sample(rng), lon + scatter.sample(rng))
}

/// How far from home (in degrees) a booking at home is made: the same for everyone who books.
pub const AT_HOME_SD: f64 = 0.04;

/// Great-circle distance in km.
pub fn distance_km(lat1: f64, lon1: f64, lat2: f64, lon2: f64) -> f64 {
    let (p1, p2) = (lat1.to_radians(), lat2.to_radians());
    let dp = p2 - p1;
    let dl = (lon2 - lon1).to_radians();
    let a = (dp / 2.0).sin().powi(2) + p1.cos() * p2.cos() * (dl / 2.0).sin().powi(2);
    2.0 * 6371.0 * a.sqrt().asin()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small(seed: u64) -> World {
        World::generate(Scale::Small, seed, &mut |_| {})
    }

    #[test]
    fn the_same_seed_makes_the_same_world() {
        let (a, b, c) = (small(5), small(5), small(6));
        let summary = |w: &World| {
            w.bookings
                .iter()
                .map(|b| (b.user, b.show, b.seats, b.booked_ms))
                .collect::<Vec<_>>()
        };
        assert_eq!(summary(&a), summary(&b));
        assert_ne!(summary(&a), summary(&c));
        assert_eq!(
            a.movies.iter().map(|m| &m.description).collect::<Vec<_>>(),
            b.movies.iter().map(|m| &m.description).collect::<Vec<_>>()
        );
    }

    #[test]
    fn bookings_fit_their_shows_and_come_before_them() {
        let world = small(1);
        let mut seats = vec![0u32; world.shows.len()];
        for booking in &world.bookings {
            let show = &world.shows[booking.show];
            assert!(booking.booked_ms < show.starts_ms, "booked after the start");
            seats[booking.show] += booking.seats;
        }
        for (show, sold) in world.shows.iter().zip(seats) {
            assert_eq!(show.seats_sold, sold);
            assert!(sold <= show.capacity);
        }
        assert!(
            world
                .bookings
                .windows(2)
                .all(|w| w[0].booked_ms <= w[1].booked_ms)
        );
        assert_eq!(world.fraud.len(), world.bookings.len());
        // Every booking is paid: its last attempt succeeded.
        let mut paid = vec![false; world.bookings.len()];
        for payment in &world.payments {
            paid[payment.booking] = payment.status == PaymentStatus::Succeeded;
        }
        assert!(paid.iter().all(|&p| p));
    }

    #[test]
    fn shows_sell_what_the_demand_curve_says() {
        // Across shows, the share sold tracks the curve: what pricing is evaluated against.
        let world = small(2);
        let (mut expected, mut sold) = (0.0, 0.0);
        for show in &world.shows {
            expected +=
                market::expected_occupancy(&show.demand, show.multiplier) * show.capacity as f64;
            sold += show.seats_sold as f64;
        }
        let fraud_seats: u32 = world
            .bookings
            .iter()
            .zip(&world.fraud)
            .filter(|(_, f)| f.is_some())
            .map(|(b, _)| b.seats)
            .sum();
        let legitimate = sold - fraud_seats as f64;
        assert!(
            (legitimate / expected - 1.0).abs() < 0.03,
            "sold {legitimate} vs expected {expected}"
        );
    }

    #[test]
    fn fraud_is_rare_and_comes_in_every_pattern() {
        let world = small(3);
        let fraud = world.fraud.iter().filter(|f| f.is_some()).count();
        let share = fraud as f64 / world.bookings.len() as f64;
        assert!((0.01..0.02).contains(&share), "fraud share {share}");
        for pattern in [
            FraudPattern::VelocityBurst,
            FraudPattern::CardTesting,
            FraudPattern::FarDevice,
            FraudPattern::OddHours,
        ] {
            assert!(
                world.fraud.contains(&Some(pattern)),
                "no {}",
                pattern.name()
            );
        }
    }

    #[test]
    fn most_shows_have_a_revenue_optimum_inside_the_price_range() {
        // What pricing is for: the best price is neither the floor nor the ceiling, and the
        // logged prices cover the range well enough to learn the response from.
        let world = small(7);
        let grid: Vec<f64> = (0..=130).map(|i| 0.7 + i as f64 * 0.01).collect();
        let interior = world
            .shows
            .iter()
            .filter(|show| {
                let revenue = |m: f64| m * market::expected_occupancy(&show.demand, m);
                let best = grid
                    .iter()
                    .copied()
                    .fold(0.7, |b, m| if revenue(m) > revenue(b) { m } else { b });
                best > 0.705 && best < 1.995
            })
            .count();
        let share = interior as f64 / world.shows.len() as f64;
        assert!(share > 0.9, "{share:.3} of shows have an interior optimum");
        let cheap = world.shows.iter().filter(|s| s.multiplier < 0.8).count();
        let dear = world.shows.iter().filter(|s| s.multiplier > 1.5).count();
        assert!(
            cheap * 20 > world.shows.len(),
            "{cheap} shows sold below 0.8×"
        );
        assert!(
            dear * 20 > world.shows.len(),
            "{dear} shows sold above 1.5×"
        );
    }

    #[test]
    fn nothing_but_behaviour_tells_fraud_apart() {
        let world = small(8);
        let fraud = |i: usize| world.fraud[i].is_some();
        // Ids: fraud accounts are numbered among everyone's by signup, not after them.
        let users = world.users.len();
        let fraudsters: Vec<usize> = world
            .bookings
            .iter()
            .enumerate()
            .filter(|(i, b)| fraud(*i) && world.users[b.user].signup_ms >= START_MS)
            .map(|(_, b)| world.users[b.user].id[1..].parse().unwrap())
            .collect();
        assert!(!fraudsters.is_empty());
        assert!(fraudsters.iter().any(|&rank| rank < users - 200));
        // Devices and cards come from one namespace.
        assert!(world.bookings.iter().all(|b| b.device.starts_with("dev-")));
        assert!(world.payments.iter().all(|p| p.card.starts_with("card-")));
        // Legitimate bookings span the seat counts fraud uses, and nobody books from exactly home.
        let max_seats = |want: bool| {
            (0..world.bookings.len())
                .filter(|&i| fraud(i) == want)
                .map(|i| world.bookings[i].seats)
                .max()
                .unwrap()
        };
        assert!(max_seats(false) >= max_seats(true));
        for booking in &world.bookings {
            let home = &world.users[booking.user];
            assert!(distance_km(home.home_lat, home.home_lon, booking.lat, booking.lon) > 0.0);
        }
        // Bursts of declines happen to legitimate bookings too.
        let mut declines = vec![0; world.bookings.len()];
        for payment in &world.payments {
            if payment.status == PaymentStatus::Failed {
                declines[payment.booking] += 1;
            }
        }
        assert!((0..world.bookings.len()).any(|i| !fraud(i) && declines[i] >= 2));
    }

    #[test]
    fn distance_is_great_circle_km() {
        // Lisbon to Madrid is about 503 km.
        let d = distance_km(38.72, -9.14, 40.42, -3.70);
        assert!((d - 503.0).abs() < 10.0, "{d}");
    }
}
