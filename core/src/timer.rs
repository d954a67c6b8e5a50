//! One timer table per state machine, indexed by an enum (the quinn shape):
//! `next` is the earliest deadline with its reason, `expired` fires the due
//! ones and nothing when called early.

use std::time::Instant;

pub trait TimerTable: Copy + Ord + 'static {
    const ALL: &'static [Self];
    fn index(self) -> usize;
}

#[derive(Clone, Debug)]
pub struct Timers<T: TimerTable> {
    deadlines: Vec<Option<Instant>>,
    _kind: std::marker::PhantomData<T>,
}

impl<T: TimerTable> Default for Timers<T> {
    fn default() -> Self {
        Timers {
            deadlines: vec![None; T::ALL.len()],
            _kind: std::marker::PhantomData,
        }
    }
}

impl<T: TimerTable> Timers<T> {
    pub fn set(&mut self, t: T, at: Instant) {
        self.deadlines[t.index()] = Some(at);
    }

    pub fn clear(&mut self, t: T) {
        self.deadlines[t.index()] = None;
    }

    pub fn clear_all(&mut self) {
        self.deadlines.iter_mut().for_each(|d| *d = None);
    }

    pub fn get(&self, t: T) -> Option<Instant> {
        self.deadlines[t.index()]
    }

    pub fn next(&self) -> Option<(Instant, T)> {
        T::ALL
            .iter()
            .filter_map(|&t| self.deadlines[t.index()].map(|d| (d, t)))
            .min()
    }

    /// Clear and return every timer due at `now`, earliest first.
    pub fn expired(&mut self, now: Instant) -> Vec<T> {
        let mut due: Vec<(Instant, T)> = T::ALL
            .iter()
            .filter_map(|&t| {
                self.deadlines[t.index()]
                    .filter(|d| *d <= now)
                    .map(|d| (d, t))
            })
            .collect();
        due.sort();
        for (_, t) in &due {
            self.clear(*t);
        }
        due.into_iter().map(|(_, t)| t).collect()
    }
}
