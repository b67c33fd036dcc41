//! Work that arrives one item at a time and is sent in batches: a few worker tasks per key, each
//! taking whatever queued while its previous round trip was out, so that a burst of thousands of
//! items costs a few calls (admissions, history reads).

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Mutex, MutexGuard};

/// Items queued by key, and how many workers serve each key. A key is present while a worker for
/// it runs.
pub struct Batches<K, T> {
    queues: Mutex<HashMap<K, (Vec<T>, usize)>>,
    /// Most workers per key at once: their round trips overlap, while each still carries a batch.
    in_flight: usize,
    /// Most items one batch takes.
    max_batch: usize,
}

impl<K: Hash + Eq + Clone, T> Batches<K, T> {
    pub fn new(in_flight: usize, max_batch: usize) -> Batches<K, T> {
        Batches {
            queues: Mutex::default(),
            in_flight: in_flight.max(1),
            max_batch: max_batch.max(1),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<K, (Vec<T>, usize)>> {
        self.queues.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `item` under `key`. True when the caller must start a worker for `key`, which takes
    /// batches with [`Batches::next`] until it gets none (fewer than `in_flight` were running).
    pub fn push(&self, key: &K, item: T) -> bool {
        let mut queues = self.lock();
        let (items, workers) = queues.entry(key.clone()).or_default();
        items.push(item);
        let start = *workers < self.in_flight;
        *workers += usize::from(start);
        start
    }

    /// The next batch for a worker of `key`, oldest items first; `None` when nothing is queued,
    /// and the worker then retires (it must not call again).
    pub fn next(&self, key: &K) -> Option<Vec<T>> {
        let mut queues = self.lock();
        let (items, workers) = queues.get_mut(key)?;
        if items.is_empty() {
            *workers -= 1;
            if *workers == 0 {
                queues.remove(key);
            }
            return None;
        }
        let n = items.len().min(self.max_batch);
        Some(items.drain(..n).collect())
    }

    /// Keys with a worker running.
    #[cfg(test)]
    fn keys(&self) -> usize {
        self.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workers_start_up_to_the_limit_and_take_batches_in_order() {
        let b: Batches<&str, u32> = Batches::new(2, 3);
        assert!(b.push(&"a", 1), "the first item starts a worker");
        assert!(b.push(&"a", 2), "a second worker while one is out");
        for i in 3..=7 {
            assert!(!b.push(&"a", i), "no third worker: item {i} waits");
        }
        assert!(b.push(&"b", 100), "each key has its own workers");
        assert_eq!(b.next(&"a"), Some(vec![1, 2, 3]));
        assert_eq!(b.next(&"a"), Some(vec![4, 5, 6]));
        assert_eq!(b.next(&"a"), Some(vec![7]));
        assert_eq!(b.next(&"a"), None, "the first worker retires");
        assert_eq!(b.keys(), 2, "one worker of a is still out");
        assert!(b.push(&"a", 8), "one worker left: a push starts another");
        assert_eq!(b.next(&"a"), Some(vec![8]));
        assert_eq!(b.next(&"a"), None);
        assert_eq!(b.next(&"a"), None, "the last two retire");
        assert_eq!(b.next(&"b"), Some(vec![100]));
        assert_eq!(b.next(&"b"), None);
        assert_eq!(b.keys(), 0, "no key is kept once its workers are gone");
    }
}
