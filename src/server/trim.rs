//! Gives memory back to the system after a wave of idle connections parks.
//!
//! Why: when an HTTP/1.1 connection parks ([`crate::server::idle`]), hyper's connection (its 8 KiB read
//! and write buffers, the service stack) is freed, but glibc's malloc keeps freed memory inside
//! its arenas: pages in the middle of a heap are not returned, so the resident set stays at the
//! high-water mark of the connections that were open at once before parking. A burst of 10,000
//! keep-alive clients measured 13.4 KiB per idle connection that way, against 3.6 KiB when the
//! same clients arrived slowly enough to park in small batches (docs/performance.md).
//! `malloc_trim(0)` walks every arena and returns the free pages inside it (`MADV_DONTNEED`);
//! after a burst's parking wave that brought the burst to about 6 KiB per connection.
//!
//! How: each park is counted ([`note_parked`]). Once [`MIN_PARKS`] have parked since the last
//! trim, a task waits [`SETTLE`] (the parked connections' hyper state is dropped just after
//! they park, and a wave goes on for as long as its clients kept arriving), then trims on a
//! blocking thread (it holds each arena's lock while it walks it, so it must not occupy a
//! runtime worker), and trims again after each further `SETTLE` in which `MIN_PARKS` parked.
//! So it runs at most once a second, and only after parking freed a few MiB; a busy connection
//! never parks, so a loaded proxy never trims. Other allocators were measured too: jemalloc
//! with its default 10 s decay kept the same high-water mark for 10 s, and needs a C build;
//! `M_TRIM_THRESHOLD` and `M_ARENA_MAX` only trim the top of a heap and changed nothing.
//!
//! Only with glibc (`target_env = "gnu"` on Linux, which the container image uses); elsewhere
//! counting parks is all this does. Uses only tokio and `libc`.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

/// Parks since the last trim that start one: at 16–20 KiB freed per parked connection, a few
/// MiB. Fewer are not worth the walk through the arenas.
pub const MIN_PARKS: usize = 256;
/// How long after a wave starts (and between trims while it goes on) to trim.
pub const SETTLE: Duration = Duration::from_secs(1);

static PARKED_SINCE_TRIM: AtomicUsize = AtomicUsize::new(0);
static TRIMMER_RUNNING: AtomicBool = AtomicBool::new(false);
static TRIMS: AtomicUsize = AtomicUsize::new(0);

/// Counts one parked connection; starts the trimmer when enough have parked. Called from
/// within the runtime (a connection's task); outside one it only counts.
pub fn note_parked() {
    let parked = PARKED_SINCE_TRIM.fetch_add(1, Ordering::Relaxed) + 1;
    if parked >= MIN_PARKS {
        start_trimmer();
    }
}

/// How many trims ran in this process (for tests and the benchmark's logs).
pub fn trims() -> usize {
    TRIMS.load(Ordering::Relaxed)
}

fn start_trimmer() {
    if !RETURNS_MEMORY || TRIMMER_RUNNING.swap(true, Ordering::AcqRel) {
        return;
    }
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => {
            runtime.spawn(trim_while_parking());
        }
        Err(_) => TRIMMER_RUNNING.store(false, Ordering::Release),
    }
}

async fn trim_while_parking() {
    // However the task ends (a runtime shutting down drops it mid-sleep), a later wave can start
    // another. A park that crosses the threshold while this one is ending leaves the count at or
    // above it, so the next park starts the next trimmer.
    struct Stopped;
    impl Drop for Stopped {
        fn drop(&mut self) {
            TRIMMER_RUNNING.store(false, Ordering::Release);
        }
    }
    let _stopped = Stopped;
    loop {
        tokio::time::sleep(SETTLE).await;
        PARKED_SINCE_TRIM.store(0, Ordering::Relaxed);
        let started = std::time::Instant::now();
        let _ = tokio::task::spawn_blocking(return_free_memory).await;
        TRIMS.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(took = ?started.elapsed(), "returned free memory after idle connections parked");
        if PARKED_SINCE_TRIM.load(Ordering::Relaxed) < MIN_PARKS {
            return;
        }
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
const RETURNS_MEMORY: bool = true;
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
const RETURNS_MEMORY: bool = false;

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn return_free_memory() {
    // SAFETY: malloc_trim takes no pointers; it only walks glibc's own arenas under their locks.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn return_free_memory() {}

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_wave_of_parks_is_followed_by_a_trim() {
        let before = trims();
        for _ in 0..MIN_PARKS {
            note_parked();
        }
        let deadline = tokio::time::Instant::now() + SETTLE * 5;
        while trims() == before {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no trim after a wave"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
