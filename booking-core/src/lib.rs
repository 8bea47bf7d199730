//! The booking core (catalog, seat holds, bookings, payments), the main client of serving.
//! Planned; nothing is implemented yet, so this crate holds no code.
