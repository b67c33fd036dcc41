//! Delivery accounting for one connection and one channel: which sequence numbers arrived, which
//! twice, and (once the publisher's count is known) which never did.
//!
//! The publisher numbers the messages of each channel 1, 2, 3, ... Delivery is normally in order,
//! so the common case is one comparison and one increment; out-of-order arrivals are kept in a
//! small sorted list until the gap before them closes.

/// Whether a received sequence number was new.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    New,
    Duplicate,
    /// Zero is never sent: the payload is not ours or is corrupt.
    Invalid,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SeqTracker {
    /// Every sequence number below this has been received (starts at 1 once anything arrives).
    next: u32,
    /// Received numbers above `next`, sorted, without repeats.
    ahead: Vec<u32>,
    duplicates: u32,
    invalid: u32,
}

/// The final figures for one connection's channel, given how many messages were sent to it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Account {
    /// Distinct messages received among those sent.
    pub received: u64,
    pub lost: u64,
    pub duplicated: u64,
    /// Numbers above the sent count (or zero): not ours to expect.
    pub unexpected: u64,
}

impl std::ops::AddAssign for Account {
    fn add_assign(&mut self, o: Account) {
        self.received += o.received;
        self.lost += o.lost;
        self.duplicated += o.duplicated;
        self.unexpected += o.unexpected;
    }
}

impl SeqTracker {
    pub fn record(&mut self, seq: u32) -> Seen {
        if seq == 0 {
            self.invalid += 1;
            return Seen::Invalid;
        }
        if self.next == 0 {
            self.next = 1;
        }
        if seq < self.next {
            self.duplicates += 1;
            return Seen::Duplicate;
        }
        if seq == self.next {
            self.next += 1;
            // Close the gap with anything that arrived early.
            let run = self
                .ahead
                .iter()
                .enumerate()
                .take_while(|&(i, &s)| s == self.next + i as u32)
                .count();
            if run > 0 {
                self.next += run as u32;
                self.ahead.drain(..run);
            }
            return Seen::New;
        }
        match self.ahead.binary_search(&seq) {
            Ok(_) => {
                self.duplicates += 1;
                Seen::Duplicate
            }
            Err(pos) => {
                self.ahead.insert(pos, seq);
                Seen::New
            }
        }
    }

    /// Figures against `sent` messages numbered 1..=sent.
    pub fn account(&self, sent: u32) -> Account {
        let contiguous = self.next.saturating_sub(1);
        let in_range_ahead = self.ahead.iter().filter(|&&s| s <= sent).count() as u32;
        let received = contiguous.min(sent) + in_range_ahead;
        let unexpected = contiguous.saturating_sub(sent)
            + (self.ahead.len() as u32 - in_range_ahead)
            + self.invalid;
        Account {
            received: received as u64,
            lost: sent.saturating_sub(received) as u64,
            duplicated: self.duplicates as u64,
            unexpected: unexpected as u64,
        }
    }

    /// The highest sequence number received (0 if none): the sent count to assume when the
    /// publisher's real count is unknown.
    pub fn highest(&self) -> u32 {
        self.ahead
            .last()
            .copied()
            .unwrap_or(self.next.saturating_sub(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acc(received: u64, lost: u64, duplicated: u64, unexpected: u64) -> Account {
        Account {
            received,
            lost,
            duplicated,
            unexpected,
        }
    }

    #[test]
    fn in_order_complete() {
        let mut t = SeqTracker::default();
        for s in 1..=100 {
            assert_eq!(t.record(s), Seen::New);
        }
        assert_eq!(t.account(100), acc(100, 0, 0, 0));
        assert!(t.ahead.is_empty());
    }

    #[test]
    fn nothing_received() {
        let t = SeqTracker::default();
        assert_eq!(t.highest(), 0);
        assert_eq!(t.account(7), acc(0, 7, 0, 0));
        assert_eq!(t.account(0), acc(0, 0, 0, 0));
    }

    #[test]
    fn gaps_tail_loss_and_duplicates() {
        let mut t = SeqTracker::default();
        for s in [1, 2, 4, 5, 2, 5, 7] {
            t.record(s);
        }
        // 3 and 6 missing in the middle, 8..=10 never came, 2 and 5 twice.
        assert_eq!(t.account(10), acc(5, 5, 2, 0));
        assert_eq!(t.ahead, vec![4, 5, 7]);
        assert_eq!(t.highest(), 7);
        assert_eq!(t.record(3), Seen::New);
        assert_eq!(t.next, 6);
        assert_eq!(t.ahead, vec![7]);
        assert_eq!(t.record(6), Seen::New);
        assert!(t.ahead.is_empty());
        assert_eq!(t.account(7), acc(7, 0, 2, 0));
    }

    #[test]
    fn reordered_and_unexpected() {
        let mut t = SeqTracker::default();
        for s in [3, 2, 1, 3, 9, 0] {
            t.record(s);
        }
        // Sent 5: 1..3 received, 3 again is a duplicate, 9 and 0 are not ours, 4 and 5 lost.
        assert_eq!(t.account(5), acc(3, 2, 1, 2));
        // Fewer sent than received in order: the extra ones are unexpected.
        assert_eq!(t.account(2), acc(2, 0, 1, 3));
    }

    #[test]
    fn every_permutation_of_small_sets_accounts_exactly() {
        // All orders of 1..=5 with one duplicate of each value: always 5 received, 5 duplicates.
        let mut seq = vec![1u32, 2, 3, 4, 5];
        let mut count = 0;
        permute(&mut seq, 0, &mut |order| {
            let mut t = SeqTracker::default();
            for &s in order.iter().chain(order.iter()) {
                t.record(s);
            }
            assert_eq!(t.account(5), acc(5, 0, 5, 0), "{order:?}");
            assert_eq!(t.account(6), acc(5, 1, 5, 0), "{order:?}");
            count += 1;
        });
        assert_eq!(count, 120);
    }

    fn permute(v: &mut Vec<u32>, k: usize, f: &mut impl FnMut(&[u32])) {
        if k == v.len() {
            f(v);
            return;
        }
        for i in k..v.len() {
            v.swap(k, i);
            permute(v, k + 1, f);
            v.swap(k, i);
        }
    }
}
