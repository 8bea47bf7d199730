//! Fraud, injected among the legitimate bookings in four known patterns, each with the traces a
//! fraud model can learn from: velocity bursts (a taken-over account books 3-12 shows minutes
//! apart), card testing (an account opened for it tries card after card, most declined),
//! far-away devices (a booking hundreds of km from home, mostly from an unknown device) and odd
//! hours (large bookings at 1-6 am by accounts opened days before). Legitimate users also
//! travel, change phones, book at night and have payments declined, so no single signal separates
//! the two. Which bookings are fraud is
//! recorded apart from them (`World::fraud`), the labels an evaluation reads and a model never sees.

use rand::RngExt;
use rand::seq::IndexedRandom;
use rand_distr::{Distribution, Normal};

use super::catalog::{CITIES, GENRES};
use super::{
    Booking, DAY_MS, FraudPattern, HOUR_MS, Payment, PaymentStatus, Rng, START_MS, User, World,
};

/// Adds fraud: about 1.5% of bookings, spread over the four patterns.
pub fn inject(rng: &mut Rng, world: &mut World) {
    let legitimate = world.bookings.len();
    let target = (legitimate as f64 * 0.015).ceil() as usize;
    let mut added = 0;
    // Bounded: a world whose shows are all full gets what fits.
    for _ in 0..target * 20 {
        if added >= target || world.shows.is_empty() {
            break;
        }
        // A burst makes 5-12 bookings, the others one: bursts are picked less often.
        added += match rng.random_range(0..10) {
            0 => velocity_burst(rng, world),
            1..=3 => card_testing(rng, world),
            4..=6 => far_device(rng, world),
            _ => odd_hours(rng, world),
        };
    }
}

/// A show starting after `at_ms` (within two days), if any.
fn show_after(rng: &mut Rng, world: &World, at_ms: i64) -> Option<usize> {
    let first = world.shows.partition_point(|s| s.starts_ms <= at_ms);
    let last = world
        .shows
        .partition_point(|s| s.starts_ms <= at_ms + 2 * DAY_MS);
    (first < last).then(|| rng.random_range(first..last))
}

/// A moment in the simulated period, away from its last two days.
fn moment(rng: &mut Rng, world: &World) -> i64 {
    let span = (world.end_ms() - START_MS - 2 * DAY_MS).max(HOUR_MS);
    START_MS + rng.random_range(0..span)
}

struct Attempt<'a> {
    user: usize,
    show: usize,
    seats: u32,
    at_ms: i64,
    device: String,
    location: (f64, f64),
    cards: &'a [String],
    declined_first: usize,
    pattern: FraudPattern,
}

/// Records a fraudulent booking with its payment attempts (`declined_first` failures first);
/// `false` when the show has too few seats left.
fn book(world: &mut World, attempt: Attempt<'_>) -> bool {
    let show = &mut world.shows[attempt.show];
    if show.capacity.saturating_sub(show.seats_sold) < attempt.seats {
        return false;
    }
    show.seats_sold += attempt.seats;
    let unit_price = (show.base_price * show.multiplier * 100.0).round() / 100.0;
    let booking = world.bookings.len();
    let amount = unit_price * attempt.seats as f64;
    for (i, card) in attempt.cards.iter().enumerate() {
        let declined = i < attempt.declined_first;
        world.payments.push(Payment {
            id: String::new(),
            booking,
            card: card.clone(),
            amount,
            status: if declined {
                PaymentStatus::Failed
            } else {
                PaymentStatus::Succeeded
            },
            at_ms: attempt.at_ms - (attempt.cards.len() - i) as i64 * 20_000,
        });
        if !declined {
            break;
        }
    }
    world.bookings.push(Booking {
        id: String::new(),
        user: attempt.user,
        show: attempt.show,
        seats: attempt.seats,
        unit_price,
        booked_ms: attempt.at_ms,
        device: attempt.device,
        lat: attempt.location.0,
        lon: attempt.location.1,
    });
    world.fraud.push(Some(attempt.pattern));
    true
}

fn far_city(rng: &mut Rng, user: &User) -> (f64, f64) {
    let others: Vec<usize> = (0..CITIES.len()).filter(|&c| c != user.city).collect();
    let city = &CITIES[*others.choose(rng).unwrap_or(&0)];
    super::around(rng, (city.lat, city.lon), super::AT_HOME_SD)
}

fn velocity_burst(rng: &mut Rng, world: &mut World) -> usize {
    let user = rng.random_range(0..world.users.len());
    let start = moment(rng, world);
    let device = super::token(rng, "dev");
    let location = if rng.random_bool(0.5) {
        far_city(rng, &world.users[user])
    } else {
        let home = (world.users[user].home_lat, world.users[user].home_lon);
        super::around(rng, home, super::AT_HOME_SD)
    };
    let cards = world.users[user].cards.clone();
    // Some bursts are short and spread out, so velocity alone does not give them away.
    let count = rng.random_range(3..=12);
    let spacing_minutes = rng.random_range(2..20);
    let mut made = 0;
    for i in 0..count {
        let at_ms = start + i * spacing_minutes * 60_000;
        let Some(show) = show_after(rng, world, at_ms) else {
            continue;
        };
        made += usize::from(book(
            world,
            Attempt {
                user,
                show,
                seats: rng.random_range(2..=6),
                at_ms,
                device: device.clone(),
                location,
                cards: &cards[..1],
                declined_first: 0,
                pattern: FraudPattern::VelocityBurst,
            },
        ));
    }
    made
}

/// A fraudster's account, opened `age_ms` before `at_ms`, giving a home somewhere in a random
/// city (scattered like real users' homes) and paying with cards taken from real users.
fn new_account(rng: &mut Rng, world: &mut World, at_ms: i64, age_ms: i64) -> usize {
    let i = world.users.len();
    let city = rng.random_range(0..CITIES.len());
    let jitter = Normal::new(0.0, 0.06).expect("valid normal");
    let cards = (0..2).map(|_| stolen_card(rng, world)).collect();
    world.users.push(User {
        id: String::new(),
        city,
        home_lat: CITIES[city].lat + jitter.sample(rng),
        home_lon: CITIES[city].lon + jitter.sample(rng),
        signup_ms: at_ms - age_ms,
        taste: [1.0 / GENRES.len() as f64; GENRES.len()],
        activity: 1.0,
        devices: vec![super::token(rng, "dev")],
        cards,
    });
    i
}

/// A real user's card, as bought from a leak.
fn stolen_card(rng: &mut Rng, world: &World) -> String {
    let victim = &world.users[rng.random_range(0..world.users.len())];
    victim.cards.choose(rng).cloned().unwrap_or_default()
}

fn card_testing(rng: &mut Rng, world: &mut World) -> usize {
    let at_ms = moment(rng, world);
    let age = rng.random_range(1..48) * HOUR_MS;
    let user = new_account(rng, world, at_ms, age);
    let Some(show) = show_after(rng, world, at_ms) else {
        return 0;
    };
    let tries = rng.random_range(2..=15);
    let cards: Vec<String> = (0..tries).map(|_| stolen_card(rng, world)).collect();
    let home = (world.users[user].home_lat, world.users[user].home_lon);
    let location = super::around(rng, home, super::AT_HOME_SD);
    usize::from(book(
        world,
        Attempt {
            user,
            show,
            seats: 1,
            at_ms,
            device: super::token(rng, "dev"),
            location,
            cards: &cards,
            declined_first: tries - 1,
            pattern: FraudPattern::CardTesting,
        },
    ))
}

fn far_device(rng: &mut Rng, world: &mut World) -> usize {
    let user = rng.random_range(0..world.users.len());
    let at_ms = moment(rng, world);
    let Some(show) = show_after(rng, world, at_ms) else {
        return 0;
    };
    let location = far_city(rng, &world.users[user]);
    let cards = world.users[user].cards.clone();
    // A stolen phone books from the user's own device.
    let device = if rng.random_bool(0.3) {
        world.users[user]
            .devices
            .first()
            .cloned()
            .unwrap_or_default()
    } else {
        super::token(rng, "dev")
    };
    usize::from(book(
        world,
        Attempt {
            user,
            show,
            seats: rng.random_range(1..=8),
            at_ms,
            device,
            location,
            cards: &cards[..1],
            declined_first: 0,
            pattern: FraudPattern::FarDevice,
        },
    ))
}

fn odd_hours(rng: &mut Rng, world: &mut World) -> usize {
    let day = (moment(rng, world) - START_MS) / DAY_MS;
    let at_ms = START_MS + day * DAY_MS + rng.random_range(HOUR_MS..6 * HOUR_MS);
    let age = rng.random_range(1..20) * DAY_MS;
    let user = new_account(rng, world, at_ms, age);
    let Some(show) = show_after(rng, world, at_ms) else {
        return 0;
    };
    let user_ref = &world.users[user];
    let home = (user_ref.home_lat, user_ref.home_lon);
    let device = user_ref.devices.choose(rng).cloned().unwrap_or_default();
    let cards = user_ref.cards.clone();
    let location = super::around(rng, home, super::AT_HOME_SD);
    let declined_first = usize::from(rng.random_bool(0.4)).min(cards.len() - 1);
    usize::from(book(
        world,
        Attempt {
            user,
            show,
            seats: rng.random_range(3..=8),
            at_ms,
            device,
            location,
            cards: &cards,
            declined_first,
            pattern: FraudPattern::OddHours,
        },
    ))
}
