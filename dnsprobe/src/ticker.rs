//! The daemon's periodic wake-up, from a timerfd.
//!
//! tokio's timer wheel wakes a task twice for a deadline more than 64 ms away: once at the
//! start of the wheel slot that holds it, to move it to a finer level, and once at the
//! deadline. On a quiet node each wake-up costs the daemon more than the work of its tick, so
//! the tick comes from the kernel instead, once per period.

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::Duration,
};

use tokio::io::{unix::AsyncFd, Interest};

#[derive(Debug, thiserror::Error)]
pub enum TickerError {
    #[error("the tick period must be between 1 ms and 1 h, not {0:?}")]
    Period(Duration),
    #[error("creating the tick timer (timerfd_create): {0}")]
    Create(io::Error),
    #[error("arming the tick timer (timerfd_settime): {0}")]
    Arm(io::Error),
    #[error("registering the tick timer with the runtime: {0}")]
    Register(io::Error),
    #[error("reading the tick timer: {0}")]
    Read(io::Error),
}

/// Fires every `period`, from the first period after it was made.
pub struct Ticker {
    timer: AsyncFd<OwnedFd>,
}

impl Ticker {
    /// Must be called within a tokio runtime with I/O enabled.
    pub fn new(period: Duration) -> Result<Self, TickerError> {
        if period < Duration::from_millis(1) || period > Duration::from_secs(3600) {
            return Err(TickerError::Period(period));
        }
        // SAFETY: plain system call; the result is checked before use.
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(TickerError::Create(io::Error::last_os_error()));
        }
        // SAFETY: `fd` was just created and is owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let every = libc::timespec {
            // At most an hour, checked above: fits any time_t.
            tv_sec: period.as_secs() as libc::time_t,
            tv_nsec: libc::c_long::from(period.subsec_nanos() as i32),
        };
        let spec = libc::itimerspec {
            it_interval: every,
            it_value: every,
        };
        // SAFETY: `spec` outlives the call; the old value is not asked for.
        let armed =
            unsafe { libc::timerfd_settime(fd.as_raw_fd(), 0, &spec, std::ptr::null_mut()) };
        if armed < 0 {
            return Err(TickerError::Arm(io::Error::last_os_error()));
        }
        // SAFETY: the OwnedFd is the timer's only owner and is moved into the AsyncFd, which
        // keeps it open and unchanged while it is registered.
        let timer = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }
            .map_err(|e| TickerError::Register(e.into_parts().1))?;
        Ok(Self { timer })
    }

    /// Waits for the next expiry. Returns how many periods ended since the last call (more
    /// than one when the daemon was busy for longer than a period). Cancel safe: dropped
    /// before it returns, it consumes nothing.
    pub async fn tick(&mut self) -> Result<u64, TickerError> {
        loop {
            let mut guard = self.timer.readable_mut().await.map_err(TickerError::Read)?;
            let mut expired = [0u8; 8];
            let read = guard.try_io(|fd| {
                // SAFETY: reads at most 8 bytes into the 8-byte buffer.
                let n = unsafe {
                    libc::read(fd.as_raw_fd(), expired.as_mut_ptr().cast(), expired.len())
                };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(())
                }
            });
            match read {
                Ok(Ok(())) => {
                    // The read emptied the timer: without this the next call would find it
                    // still marked ready and spend a read on learning otherwise, at every
                    // tick. A newer expiry is not lost: tokio keeps a readiness that arrived
                    // after this guard was made.
                    guard.clear_ready();
                    return Ok(u64::from_ne_bytes(expired));
                }
                Ok(Err(err)) => return Err(TickerError::Read(err)),
                // Not expired after all (the readiness was stale): wait again.
                Err(_would_block) => continue,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[tokio::test]
    async fn ticks_once_per_period_and_counts_the_missed_ones() {
        let period = Duration::from_millis(20);
        let start = Instant::now();
        let mut ticker = Ticker::new(period).unwrap();
        // A tick lost (a readiness cleared too eagerly) fails here instead of hanging.
        let deadline = Duration::from_secs(5);
        let first = tokio::time::timeout(deadline, ticker.tick()).await;
        assert!(first.expect("the first tick came").unwrap() >= 1);
        assert!(start.elapsed() >= period, "{:?}", start.elapsed());
        // Busy for several periods (the daemon at work, not a wait): the next tick says how
        // many ended.
        std::thread::sleep(period * 3 + period / 2);
        let missed = tokio::time::timeout(deadline, ticker.tick()).await;
        let missed = missed.expect("the second tick came").unwrap();
        assert!(missed >= 3, "{missed} periods ended");
        // And ticking goes on after that.
        for n in 0..3 {
            let next = tokio::time::timeout(deadline, ticker.tick()).await;
            assert!(next.unwrap_or_else(|_| panic!("tick {n} after")).unwrap() >= 1);
        }
    }

    #[test]
    fn a_period_out_of_range_is_refused() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .unwrap();
        let _in_runtime = rt.enter();
        assert!(matches!(
            Ticker::new(Duration::ZERO),
            Err(TickerError::Period(_))
        ));
        assert!(matches!(
            Ticker::new(Duration::from_secs(7200)),
            Err(TickerError::Period(_))
        ));
    }
}
