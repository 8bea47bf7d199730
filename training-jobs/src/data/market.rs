//! Who goes to which show at what price. Each show meets a demand set by its movie's appeal and
//! age, the weekday and hour, and its price; the share of seats it sells follows a known curve
//! ([`expected_occupancy`]), so a pricing policy can be scored on what the market would really
//! have done at any price, not only at the price that was charged. Seats go to users by taste and
//! distance, booked ahead of the show by a lead time that is longer for weekend evenings.

use rand::RngExt;
use rand::distr::weighted::WeightedIndex;
use rand::seq::IndexedRandom;
use rand_distr::{Binomial, Distribution, Exp, Gamma, LogNormal, Normal};

use super::catalog::{self, CITIES, GENRES};
use super::{
    Booking, DAY_MS, HOUR_MS, Movie, Payment, PaymentStatus, Rng, START_MS, Show, Size, Theater,
    User, World,
};

/// Show start times, as hours after midnight.
pub const SHOW_HOURS: [f64; 5] = [11.0, 14.0, 17.0, 19.5, 22.0];

/// How price-sensitive the market is: occupancy falls by this much logit per unit of multiplier.
/// At 1.3 the revenue-maximising multiplier, 1 / (1.3 (1 - occupancy)), lies inside 0.7-2.0 for
/// nearly every show, so pricing has a real optimum to find rather than the floor.
pub const PRICE_SENSITIVITY: f64 = 1.3;

/// What a show's demand depends on, apart from its price.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ShowDemand {
    /// The movie's appeal at the time of the show (appeal decayed by weeks since release).
    pub popularity: f64,
    /// 0 = Monday.
    pub weekday: u32,
    /// Hour of the day the show starts (e.g. 19.5).
    pub hour: f64,
}

impl ShowDemand {
    /// The show's appeal on the logit scale, before price.
    fn utility(&self) -> f64 {
        let weekday = [-0.45, -0.55, -0.35, -0.2, 0.25, 0.55, 0.35][self.weekday as usize % 7];
        let hour = match self.hour {
            h if h < 13.0 => -0.7,
            h if h < 16.0 => -0.35,
            h if h < 18.5 => 0.0,
            h if h < 21.0 => 0.45,
            _ => 0.05,
        };
        -1.0 + 0.9 * self.popularity.ln() + weekday + hour
    }
}

/// The share of seats a show sells by its start at `multiplier` × base price: the ground truth
/// the pricing evaluation simulates against.
pub fn expected_occupancy(demand: &ShowDemand, multiplier: f64) -> f64 {
    let logit = demand.utility() - PRICE_SENSITIVITY * (multiplier - 1.0);
    1.0 / (1.0 + (-logit).exp())
}

/// The mean booking lead time: weekend evenings are booked further ahead (Friday counts here: people
/// plan Friday nights like Saturdays, though the rule table prices only Saturday and Sunday up).
fn lead_hours(demand: &ShowDemand) -> f64 {
    let weekend = demand.weekday >= 4;
    let evening = demand.hour >= 18.0;
    18.0 + if weekend { 18.0 } else { 0.0 } + if evening { 10.0 } else { 0.0 }
}

/// The rule table's multiplier (the pricing fallback): +20% at peak hours, +15% at weekends.
pub fn rule_multiplier(weekday: u32, hour: f64) -> f64 {
    let peak = (18.0..22.0).contains(&hour);
    let weekend = weekday >= 5;
    (if peak { 1.2 } else { 1.0 }) * (if weekend { 1.15 } else { 1.0 })
}

pub fn users(rng: &mut Rng, size: Size) -> Vec<User> {
    let city_pick = WeightedIndex::new(CITIES.iter().map(|c| c.weight)).expect("positive weights");
    let taste_gamma = Gamma::new(0.35, 1.0).expect("valid gamma");
    let activity = LogNormal::new(-0.25, 0.7).expect("valid lognormal");
    let jitter = Normal::new(0.0, 0.06).expect("valid normal");
    (0..size.users)
        .map(|_| {
            let city = city_pick.sample(rng);
            let mut taste = [0.0; GENRES.len()];
            for weight in &mut taste {
                *weight = taste_gamma.sample(rng) + 1e-3;
            }
            let total: f64 = taste.iter().sum();
            taste.iter_mut().for_each(|w| *w /= total);
            let devices = (0..rng.random_range(1..=2))
                .map(|_| super::token(rng, "dev"))
                .collect();
            let cards = (0..rng.random_range(1..=2))
                .map(|_| super::token(rng, "card"))
                .collect();
            User {
                // Numbered by signup once everyone exists (`World::number`).
                id: String::new(),
                city,
                home_lat: CITIES[city].lat + jitter.sample(rng),
                home_lon: CITIES[city].lon + jitter.sample(rng),
                // Most accounts predate the period (by more than the longest booking lead, so
                // they exist for every booking of the first shows); some open during it.
                signup_ms: if rng.random_bool(0.15) {
                    START_MS + rng.random_range(0..(size.days as i64 * DAY_MS).max(1))
                } else {
                    START_MS - rng.random_range(15..=1_500) as i64 * DAY_MS
                },
                taste,
                activity: activity.sample(rng),
                devices,
                cards,
            }
        })
        .collect()
}

pub fn movies(rng: &mut Rng, size: Size) -> (Vec<Movie>, Vec<catalog::MovieText>) {
    let appeal = LogNormal::new(0.0, 0.6).expect("valid lognormal");
    let span_days = size.days as i64;
    let mut movies = Vec::with_capacity(size.movies);
    let mut texts = Vec::with_capacity(size.movies);
    let mut writer = catalog::Writer::default();
    for i in 0..size.movies {
        let primary = rng.random_range(0..GENRES.len());
        let mut genres = vec![primary];
        while genres.len() < 3 && rng.random_bool(0.45) {
            let other = rng.random_range(0..GENRES.len());
            if !genres.contains(&other) {
                genres.push(other);
            }
        }
        // Most of the catalogue is older; a steady stream is released during the period.
        let release_day = if rng.random_bool(0.7) {
            -rng.random_range(30..3_000)
        } else {
            rng.random_range(-30..span_days.max(1))
        };
        let text = writer.movie_text(rng, primary);
        movies.push(Movie {
            id: format!("m{i}"),
            title: text.title.clone(),
            description: text.description.clone(),
            genres,
            release_ms: START_MS + release_day * DAY_MS,
            appeal: appeal.sample(rng),
            runtime_minutes: rng.random_range(80..170),
        });
        texts.push(text);
    }
    (movies, texts)
}

pub fn theaters(rng: &mut Rng, size: Size) -> Vec<Theater> {
    let city_pick = WeightedIndex::new(CITIES.iter().map(|c| c.weight)).expect("positive weights");
    let jitter = Normal::new(0.0, 0.03).expect("valid normal");
    (0..size.theaters)
        .map(|i| {
            // Every city gets a theater before any gets a second.
            let city = if i < CITIES.len() {
                i
            } else {
                city_pick.sample(rng)
            };
            let screens = (0..rng.random_range(3..=6))
                .map(|_| rng.random_range(5..=20) * 10)
                .collect();
            Theater {
                id: format!("t{i}"),
                name: format!("Marquee {} {}", CITIES[city].name, i + 1),
                city,
                lat: CITIES[city].lat + jitter.sample(rng),
                lon: CITIES[city].lon + jitter.sample(rng),
                screens,
                list_price: (rng.random_range(80..=140) as f64) / 10.0,
            }
        })
        .collect()
}

/// A movie's pull at `at_ms`: new releases draw crowds that fade over weeks; the back catalogue
/// keeps a fraction of its appeal.
fn popularity(movie: &Movie, at_ms: i64) -> f64 {
    let weeks = (at_ms - movie.release_ms) as f64 / (7.0 * DAY_MS as f64);
    if weeks < 0.0 {
        return 0.0;
    }
    movie.appeal * (0.25 + 1.75 * (-weeks / 3.0).exp())
}

/// Every screen's programme: each day's slots go to movies by their current popularity; each
/// show's price multiplier is the rule table's, perturbed (the exploration a demand model needs).
/// In start-time order.
pub fn shows(rng: &mut Rng, size: Size, movies: &[Movie], theaters: &[Theater]) -> Vec<Show> {
    let mut shows = Vec::new();
    let explore = LogNormal::new(0.0, 0.25).expect("valid lognormal");
    for day in 0..size.days as i64 {
        let midday = START_MS + day * DAY_MS + 12 * HOUR_MS;
        let weights: Vec<f64> = movies
            .iter()
            .map(|m| popularity(m, midday).powi(2))
            .collect();
        let Ok(pick) = WeightedIndex::new(&weights) else {
            continue;
        };
        let weekday = (day % 7) as u32;
        for (t, theater) in theaters.iter().enumerate() {
            for (screen, &capacity) in theater.screens.iter().enumerate() {
                // A screen keeps one movie for the day.
                let movie = pick.sample(rng);
                for &hour in &SHOW_HOURS {
                    let starts_ms = START_MS + day * DAY_MS + (hour * HOUR_MS as f64) as i64;
                    let demand = ShowDemand {
                        popularity: popularity(&movies[movie], starts_ms).max(1e-3),
                        weekday,
                        hour,
                    };
                    let multiplier =
                        (rule_multiplier(weekday, hour) * explore.sample(rng)).clamp(0.7, 2.0);
                    shows.push(Show {
                        // Numbered once the programme is in start-time order.
                        id: String::new(),
                        movie,
                        theater: t,
                        screen,
                        capacity,
                        starts_ms,
                        base_price: theater.list_price,
                        multiplier: (multiplier * 100.0).round() / 100.0,
                        demand,
                        seats_sold: 0,
                    });
                }
            }
        }
    }
    shows.sort_by_key(|s| (s.starts_ms, s.theater, s.screen));
    for (i, show) in shows.iter_mut().enumerate() {
        show.id = format!("s{i}");
    }
    shows
}

/// Sells every show: seats sold from the demand curve, split into bookings of 1-8 seats (mostly
/// one or two; families and groups make the tail), each
/// given to a user who likes the movie's genres and lives near the theater, at a lead time
/// before the show; each paid by card (some first attempts fail and are retried).
pub fn sell(rng: &mut Rng, world: &mut World) {
    let mut by_city: Vec<Vec<usize>> = vec![Vec::new(); CITIES.len()];
    for (i, user) in world.users.iter().enumerate() {
        by_city[user.city].push(i);
    }
    let group =
        WeightedIndex::new([34.0, 39.0, 13.0, 9.0, 2.2, 1.4, 0.8, 0.6]).expect("positive weights");
    for s in 0..world.shows.len() {
        let show = &world.shows[s];
        let occupancy = expected_occupancy(&show.demand, show.multiplier);
        let sold = Binomial::new(show.capacity as u64, occupancy)
            .expect("valid binomial")
            .sample(rng) as u32;
        let theater = &world.theaters[show.theater];
        let movie = &world.movies[show.movie];
        let lead = Exp::new(1.0 / lead_hours(&show.demand)).expect("valid exponential");
        let locals = &by_city[theater.city];
        let (starts_ms, unit_price, genres) = (
            show.starts_ms,
            (show.base_price * show.multiplier * 100.0).round() / 100.0,
            movie.genres.clone(),
        );
        let mut left = sold;
        while left > 0 {
            let seats = (group.sample(rng) as u32 + 1).min(left);
            left -= seats;
            let hours: f64 = lead.sample(rng).clamp(0.1, 24.0 * 14.0);
            let booked_ms = starts_ms - (hours * HOUR_MS as f64) as i64;
            let user = choose_user(rng, &world.users, locals, &genres, booked_ms);
            let buyer = &world.users[user];
            let booking = world.bookings.len();
            let card = buyer.cards.choose(rng).cloned().unwrap_or_default();
            let amount = unit_price * seats as f64;
            // Some first attempts are declined; now and then a card over its limit is declined
            // several times before the buyer gives up on it and pays.
            let declines = match rng.random_range(0..1000) {
                0..4 => rng.random_range(2..=4),
                4..34 => 1,
                _ => 0,
            };
            for attempt in 0..declines {
                world.payments.push(Payment {
                    id: String::new(),
                    booking,
                    card: card.clone(),
                    amount,
                    status: PaymentStatus::Failed,
                    at_ms: booked_ms - (declines - attempt) as i64 * 60_000,
                });
            }
            world.payments.push(Payment {
                id: String::new(),
                booking,
                card,
                amount,
                status: PaymentStatus::Succeeded,
                at_ms: booked_ms,
            });
            // Travellers: a few legitimate bookings come from far away, some on a borrowed or
            // new device; people also change phones at home.
            let travelling = rng.random_bool(0.03);
            let (lat, lon) = if travelling {
                let city = &CITIES[rng.random_range(0..CITIES.len())];
                super::around(rng, (city.lat, city.lon), super::AT_HOME_SD)
            } else {
                super::around(rng, (buyer.home_lat, buyer.home_lon), super::AT_HOME_SD)
            };
            let device = if rng.random_bool(if travelling { 0.4 } else { 0.03 }) {
                super::token(rng, "dev")
            } else {
                buyer.devices.choose(rng).cloned().unwrap_or_default()
            };
            world.bookings.push(Booking {
                id: String::new(),
                user,
                show: s,
                seats,
                unit_price,
                booked_ms,
                device,
                lat,
                lon,
            });
            world.fraud.push(None);
        }
        world.shows[s].seats_sold = sold;
    }
}

/// Picks a buyer with an account at `at_ms` among a few local candidates, by taste for the
/// movie's genres and activity; one in twenty buyers comes from anywhere.
fn choose_user(
    rng: &mut Rng,
    users: &[User],
    locals: &[usize],
    genres: &[usize],
    at_ms: i64,
) -> usize {
    let pool = if locals.is_empty() || rng.random_bool(0.05) {
        None
    } else {
        Some(locals)
    };
    let mut best: Option<(f64, usize)> = None;
    // Most accounts predate the period, so a few draws find one open at `at_ms`.
    for draw in 0..64 {
        if draw >= 12 && best.is_some() {
            break;
        }
        let candidate = match pool {
            Some(locals) if draw < 32 => locals[rng.random_range(0..locals.len())],
            _ => rng.random_range(0..users.len()),
        };
        let user = &users[candidate];
        if user.signup_ms > at_ms {
            continue;
        }
        let affinity: f64 = genres
            .iter()
            .enumerate()
            .map(|(rank, &g)| user.taste[g] / (rank + 1) as f64)
            .sum();
        // Gumbel-max: sampling in proportion to exp(score).
        let gumbel = -(-(rng.random::<f64>().max(1e-12)).ln()).ln();
        let score = 6.0 * affinity + user.activity.ln() + gumbel;
        if best.is_none_or(|(b, _)| score > b) {
            best = Some((score, candidate));
        }
    }
    best.map_or(0, |(_, user)| user)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn demand(popularity: f64) -> ShowDemand {
        ShowDemand {
            popularity,
            weekday: 5,
            hour: 19.5,
        }
    }

    #[test]
    fn demand_falls_with_price_and_rises_with_popularity() {
        let d = demand(1.0);
        assert!(expected_occupancy(&d, 0.8) > expected_occupancy(&d, 1.0));
        assert!(expected_occupancy(&d, 1.0) > expected_occupancy(&d, 1.5));
        assert!(expected_occupancy(&demand(2.0), 1.0) > expected_occupancy(&d, 1.0));
    }

    #[test]
    fn revenue_peaks_inside_the_price_range() {
        // The pricing model has something to find: neither the cheapest nor the dearest price.
        let d = demand(1.0);
        let revenue = |m: f64| m * expected_occupancy(&d, m);
        let grid: Vec<f64> = (0..=130).map(|i| 0.7 + i as f64 * 0.01).collect();
        let best = grid
            .iter()
            .copied()
            .fold(0.7, |b, m| if revenue(m) > revenue(b) { m } else { b });
        assert!(best > 0.75 && best < 1.95, "best multiplier {best}");
    }

    #[test]
    fn the_rule_table_adds_peak_and_weekend() {
        assert_eq!(rule_multiplier(1, 11.0), 1.0);
        assert!((rule_multiplier(1, 19.5) - 1.2).abs() < 1e-12);
        assert!((rule_multiplier(6, 11.0) - 1.15).abs() < 1e-12);
        assert!((rule_multiplier(6, 19.5) - 1.38).abs() < 1e-12);
    }
}
