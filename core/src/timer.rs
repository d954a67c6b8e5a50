//! One timer table per state machine, indexed by the machine's timer enum
//! (the quinn shape): `next` is the earliest deadline with its reason,
//! `expired` fires the due ones and nothing when called early.
//!
//! Every machine uses this one type. A kind may carry a key (a registry op,
//! a tunnel, a target dial: `OpDeadline(op)`, `Dial(attempt, cid)`), so one
//! table holds any number of timers of that kind, each armed at most once.
//! Timers due at the same instant come out in the order of their enum
//! (derived `Ord`): the same inputs always fire in the same order.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

#[derive(Clone, Debug)]
pub struct Timers<T: Copy + Ord> {
    /// Deadlines in firing order: by instant, then by timer.
    queue: BTreeSet<(Instant, T)>,
    /// Each armed timer's deadline, to find it in `queue`.
    armed: BTreeMap<T, Instant>,
}

impl<T: Copy + Ord> Default for Timers<T> {
    fn default() -> Self {
        Timers {
            queue: BTreeSet::new(),
            armed: BTreeMap::new(),
        }
    }
}

impl<T: Copy + Ord> Timers<T> {
    /// Arm `t` at `at`, replacing its previous deadline if it had one.
    pub fn set(&mut self, t: T, at: Instant) {
        if let Some(old) = self.armed.insert(t, at) {
            self.queue.remove(&(old, t));
        }
        self.queue.insert((at, t));
        debug_assert_eq!(self.queue.len(), self.armed.len());
    }

    pub fn clear(&mut self, t: T) {
        if let Some(old) = self.armed.remove(&t) {
            self.queue.remove(&(old, t));
        }
        debug_assert_eq!(self.queue.len(), self.armed.len());
    }

    pub fn clear_all(&mut self) {
        self.queue.clear();
        self.armed.clear();
    }

    pub fn get(&self, t: T) -> Option<Instant> {
        self.armed.get(&t).copied()
    }

    /// How many timers are armed.
    pub fn len(&self) -> usize {
        self.armed.len()
    }

    pub fn is_empty(&self) -> bool {
        self.armed.is_empty()
    }

    /// The earliest deadline and its timer.
    pub fn next(&self) -> Option<(Instant, T)> {
        self.queue.first().copied()
    }

    /// Clear and return every timer due at `now`, earliest first (equal
    /// deadlines in timer order). Timers armed while the caller handles
    /// these wait for the next call.
    pub fn expired(&mut self, now: Instant) -> Vec<T> {
        let mut due = Vec::new();
        while let Some(t) = self.pop_expired(now) {
            due.push(t);
        }
        due
    }

    /// Clear and return the earliest timer due at `now`, if any. A caller
    /// that loops on this also fires timers armed (already due) or cleared
    /// while it handles the previous ones.
    pub fn pop_expired(&mut self, now: Instant) -> Option<T> {
        let &(at, t) = self.queue.first()?;
        if at > now {
            return None;
        }
        self.queue.pop_first();
        self.armed.remove(&t);
        debug_assert_eq!(self.queue.len(), self.armed.len());
        Some(t)
    }
}
