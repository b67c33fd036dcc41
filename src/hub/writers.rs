//! The fan-out writers: threads that write a large fan-out's events to its streams' sockets.
//!
//! Writing one event to a loopback or LAN socket costs a few microseconds of kernel time, so a
//! broadcast to thousands of streams is milliseconds of `writev` calls. Split over the cores, the
//! last stream gets its event that many times sooner. Order is safe whoever writes: each stream's
//! writes take its own outbox in order, under its lock. The writers run below the runtime's
//! priority ([`crate::sched`]): on saturated cores, serving connections comes first.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use super::stream::Stream;

/// Fewer streams than this are written by the delivering thread itself: handing work to another
/// thread costs a wake-up, worth it only for a real fan-out.
const SPLIT_MIN: usize = 256;

/// A pool of writer threads, stopped when dropped.
pub struct Writers {
    shared: Arc<Shared>,
    threads: usize,
}

#[derive(Default)]
struct Shared {
    jobs: Mutex<Jobs>,
    ready: Condvar,
}

#[derive(Default)]
struct Jobs {
    queue: VecDeque<Vec<Arc<Stream>>>,
    stop: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Jobs> {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Writers {
    /// A pool of `threads` writers; one that cannot be started is done without.
    pub fn new(threads: usize) -> Writers {
        let shared = Arc::new(Shared::default());
        let mut started = 0;
        for i in 0..threads {
            let shared = shared.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("sse-writer-{i}"))
                .spawn(move || work(&shared));
            match spawned {
                Ok(_) => started += 1,
                Err(error) => tracing::warn!(%error, "cannot start a fan-out writer thread"),
            }
        }
        Writers {
            shared,
            threads: started,
        }
    }

    /// One writer per core.
    pub fn per_core() -> Writers {
        Writers::new(std::thread::available_parallelism().map_or(1, |n| n.get()))
    }

    /// Flushes every stream of `conns`: a few on this thread, many on the writers, shared
    /// between them. Returns at once in that case, so the delivering thread (a runtime worker)
    /// never spends milliseconds in `writev` while connections wait to be served.
    pub fn flush(&self, mut conns: Vec<Arc<Stream>>) {
        if self.threads == 0 || conns.len() < SPLIT_MIN {
            for conn in &conns {
                conn.flush();
            }
            return;
        }
        // In creation order (a batch of unicast events comes in any order): see `AppEntry::conns`.
        conns.sort_unstable_by_key(|c| c.key);
        // Every writer gets a share worth its wake-up: on a large machine a fan-out of a few
        // hundred streams goes to one or two writers, not to all of them.
        let parts = self.threads.min(conns.len() / SPLIT_MIN).max(1);
        let share = conns.len().div_ceil(parts);
        let mut jobs = self.shared.lock();
        while !conns.is_empty() {
            let part = conns.split_off(conns.len().saturating_sub(share));
            jobs.queue.push_back(part);
            self.shared.ready.notify_one();
        }
    }
}

fn work(shared: &Shared) {
    crate::sched::lower_this_thread();
    loop {
        let job = {
            let mut jobs = shared.lock();
            loop {
                if jobs.stop {
                    return;
                }
                if let Some(job) = jobs.queue.pop_front() {
                    break job;
                }
                jobs = shared.ready.wait(jobs).unwrap_or_else(|p| p.into_inner());
            }
        };
        for conn in &job {
            conn.flush();
        }
    }
}

impl Drop for Writers {
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.ready.notify_all();
    }
}
