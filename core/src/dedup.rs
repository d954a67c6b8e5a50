//! Per-flow duplicate suppression: the last sequence number seen on each
//! recently closed flow, in an LRU with a hard bound.
//!
//! A live flow knows its next expected seq itself (see [`crate::flow::Flow`]);
//! this remembers flows after they end, so that a late duplicate of a closed
//! flow's DATA is dropped and counted as a duplicate rather than treated as a
//! frame for an unknown flow.

use std::collections::BTreeMap;

use crate::frame::{Cid, Seq};

#[derive(Clone, Debug)]
pub struct DedupLru {
    capacity: usize,
    /// cid → (number of DATA frames received, recency stamp)
    entries: BTreeMap<Cid, (Seq, u64)>,
    /// recency stamp → cid, oldest first
    order: BTreeMap<u64, Cid>,
    next_stamp: u64,
    evictions: u64,
}

impl DedupLru {
    pub fn new(capacity: usize) -> Self {
        DedupLru {
            capacity: capacity.max(1),
            entries: BTreeMap::new(),
            order: BTreeMap::new(),
            next_stamp: 0,
            evictions: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn evictions(&self) -> u64 {
        self.evictions
    }

    /// Remember that `cid` closed after `received` DATA frames.
    pub fn record(&mut self, cid: Cid, received: Seq) {
        let stamp = self.next_stamp;
        self.next_stamp += 1;
        if let Some((_, old)) = self.entries.insert(cid, (received, stamp)) {
            self.order.remove(&old);
        }
        self.order.insert(stamp, cid);
        while self.entries.len() > self.capacity {
            let Some((_, victim)) = self.order.pop_first() else {
                break;
            };
            self.entries.remove(&victim);
            self.evictions += 1;
        }
        debug_assert_eq!(self.entries.len(), self.order.len());
    }

    /// Whether `cid` is a recently closed flow.
    pub fn contains(&self, cid: Cid) -> bool {
        self.entries.contains_key(&cid)
    }

    /// Whether a DATA frame `seq` on `cid` is a duplicate of one already seen.
    pub fn is_duplicate(&self, cid: Cid, seq: Seq) -> bool {
        matches!(self.entries.get(&cid), Some((received, _)) if seq < *received)
    }
}
