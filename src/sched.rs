//! Thread scheduling: the fan-out writers give way to the runtime when every core is busy.
//!
//! A saturated gateway has two kinds of work: the runtime's (accepting connections, admitting and
//! replaying resuming streams, Redis replies, timers) and the writers' bulk fan-out, mostly kernel
//! time in `writev`. Left at equal weight they share the cores evenly, and in a reconnect storm every
//! stream still waiting for its `200` waits behind broadcasts to the streams already back. At a lower
//! priority the writers still get a tenth of a contended core, and whatever they leave waiting is
//! written together later (an outbox is flushed whole): events are delayed, and the outbox limits
//! apply as before. On a machine with idle cores nothing changes.
//!
//! Measured (`docs/benchmarks.md`): the 19,500-stream storm 11% faster (medians of sixteen),
//! broadcast deliveries per CPU-second and their latency unchanged.
#![allow(unsafe_code)]

/// The writers' `nice` value: the runtime's threads outweigh them about ten to one on a busy core.
pub const WRITER_NICE: i32 = 10;

/// Lowers the calling thread's priority to [`WRITER_NICE`] (a thread already lower keeps its
/// own). Raising one's own nice value needs no privilege; a failure only means the thread keeps
/// its priority.
#[cfg(target_os = "linux")]
pub fn lower_this_thread() {
    if this_thread_nice() < WRITER_NICE {
        // SAFETY: gettid has no preconditions; setpriority only reads its integer arguments, and
        // on Linux PRIO_PROCESS with a thread id names that one thread.
        unsafe {
            libc::setpriority(
                libc::PRIO_PROCESS,
                libc::gettid() as libc::id_t,
                WRITER_NICE,
            )
        };
    }
}

#[cfg(not(target_os = "linux"))]
pub fn lower_this_thread() {}

/// The calling thread's nice value.
#[cfg(target_os = "linux")]
fn this_thread_nice() -> i32 {
    // SAFETY: as in `lower_this_thread`; getpriority only reads its integer arguments.
    unsafe { libc::getpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t) }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn lowers_only_the_calling_thread() {
        let before = this_thread_nice();
        let lowered = std::thread::spawn(|| {
            lower_this_thread();
            this_thread_nice()
        })
        .join()
        .unwrap_or(before);
        assert_eq!(lowered, before.max(WRITER_NICE));
        assert_eq!(
            this_thread_nice(),
            before,
            "other threads keep their priority"
        );
    }
}
