//! A clock read once per batch of ring-buffer records, for the lifetimes of cached state.
//!
//! The caches a query goes through (process names, workloads, resolver configurations) each
//! checked an entry's age with `Instant::elapsed`, three clock reads per query: a tenth of
//! the daemon's time under load. Their lifetimes are seconds long; a batch takes
//! milliseconds. While a [`Frozen`] guard lives, [`now`] returns the time it was taken;
//! without one (tests, other threads) it reads the clock.

use std::{
    cell::Cell,
    time::{Duration, Instant},
};

thread_local! {
    static FROZEN: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// Keeps [`now`] at the time it was made, on this thread, until dropped.
#[must_use = "the clock is frozen only while the guard lives"]
pub struct Frozen {
    previous: Option<Instant>,
}

pub fn freeze() -> Frozen {
    Frozen {
        previous: FROZEN.replace(Some(Instant::now())),
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        FROZEN.set(self.previous);
    }
}

pub fn now() -> Instant {
    FROZEN.get().unwrap_or_else(Instant::now)
}

/// How long ago `since` was, by [`now`]; zero for a time after it.
pub fn elapsed(since: impl std::borrow::Borrow<Instant>) -> Duration {
    now().saturating_duration_since(*since.borrow())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frozen_clock_stands_still_and_thaws() {
        let frozen = freeze();
        let at = now();
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(now(), at);
        {
            let _inner = freeze();
            assert!(now() > at, "a new guard takes the time anew");
        }
        assert_eq!(now(), at, "the outer guard's time is back");
        drop(frozen);
        assert!(now() > at);
        assert_eq!(elapsed(now() + Duration::from_secs(1)), Duration::ZERO);
    }
}
