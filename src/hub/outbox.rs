//! A stream's outbox (the encoded events waiting for its socket, under a budget) and the contract
//! between the hub and a transport that writes them (HTTP/1.1 chunks on the lean path).

use std::collections::VecDeque;
use std::io;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};

/// How much a stream may have waiting before its client counts as too slow.
#[derive(Debug, Clone, Copy)]
pub struct OutboxLimits {
    pub events: usize,
    pub bytes: usize,
}

/// Events waiting for a stream's socket.
///
/// Its fields are private: the stream counts the budget and a [`Wire`] reads and takes events, both
/// through the methods below.
#[derive(Default)]
pub struct Outbox {
    /// Encoded events not yet started, oldest first.
    events: VecDeque<Bytes>,
    /// Their total size, for the byte budget.
    bytes: usize,
    /// What is left of a write cut short, already framed: it goes out before `events`.
    partial: Bytes,
}

impl Outbox {
    /// The events not yet started, oldest first (a wire frames and writes them in this order).
    pub fn events(&self) -> std::collections::vec_deque::Iter<'_, Bytes> {
        self.events.iter()
    }

    /// What is left of a write cut short, already framed: it goes out before [`Outbox::events`].
    pub fn partial(&self) -> &[u8] {
        &self.partial
    }

    /// Marks up to `n` bytes of the partial write as written; returns how many it took.
    pub fn advance_partial(&mut self, n: usize) -> usize {
        let taken = self.partial.len().min(n);
        self.partial.advance(taken);
        if self.partial.is_empty() {
            self.partial = Bytes::new(); // let go of the buffer it pointed into
        }
        taken
    }

    /// Keeps `rest`, the framed remainder of an event the socket took only part of, to go out
    /// first next time.
    pub fn set_partial(&mut self, rest: Bytes) {
        self.partial = rest;
    }

    /// Takes the oldest event off the queue.
    pub fn pop(&mut self) -> Option<Bytes> {
        let b = self.events.pop_front()?;
        self.bytes = self.bytes.saturating_sub(b.len());
        if self.events.is_empty() && self.events.capacity() > 1 {
            // Back to one slot once a burst is over: idle streams are many.
            self.events = VecDeque::new();
        }
        Some(b)
    }

    /// An outbox holding `partial`, then `events` (counted): for the tests of a wire.
    #[cfg(test)]
    pub fn holding(partial: Bytes, events: impl IntoIterator<Item = Bytes>) -> Outbox {
        let mut out = Outbox {
            partial,
            ..Outbox::default()
        };
        for b in events {
            out.push(b);
        }
        out
    }

    /// The size the budget counts: what is queued, and the events held aside for the stream that
    /// were counted when they arrived.
    pub fn counted_bytes(&self) -> usize {
        self.bytes
    }

    /// Events waiting (not counting a partial write).
    pub(super) fn len(&self) -> usize {
        self.events.len()
    }

    /// Counts `n` bytes held aside for the stream (live events held while it catches up).
    pub(super) fn count(&mut self, n: usize) {
        self.bytes += n;
    }

    /// Stops counting `n` bytes (a held event that was not queued after all).
    pub(super) fn uncount(&mut self, n: usize) {
        self.bytes = self.bytes.saturating_sub(n);
    }

    pub fn is_empty(&self) -> bool {
        self.events.is_empty() && self.partial.is_empty()
    }

    /// Queues an event and counts it in the budget.
    pub(super) fn push(&mut self, b: Bytes) {
        self.bytes += b.len();
        self.queue(b);
    }

    /// Queues without counting (the caller already did). One event at a time, the common case,
    /// lives in a one-slot buffer that stays: no allocation per event, 32 bytes per idle stream.
    pub(super) fn queue(&mut self, b: Bytes) {
        if self.events.capacity() == 0 {
            self.events.reserve_exact(1);
        }
        self.events.push_back(b);
    }
}

/// A stream's socket, seen from the hub: the transport frames events its own way (HTTP/1.1
/// chunks), the hub decides when to write. No method waits.
pub trait Wire: Send + 'static {
    /// Writes the outbox, framed, as far as the socket takes it, removing what was written.
    /// `Ok(true)`: everything went; `Ok(false)`: the socket is full.
    fn write(&mut self, out: &mut Outbox) -> io::Result<bool>;
    /// Ready once the socket may take more after a write that filled it.
    fn poll_writable(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
    /// Ready once the client has closed its side, sent anything at all (a stream is one-way), or
    /// the connection failed.
    fn poll_closed(&mut self, cx: &mut Context<'_>) -> Poll<()>;
    /// Ends the stream in the transport's way (the last chunk) and closes the sending side.
    fn end(&mut self);
}
