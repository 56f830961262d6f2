//! Pending frees: host cluster references a mapping change dropped, waiting until dropping
//! them is safe (DESIGN.md §3 rule 7).
//!
//! A reference may be dropped (its refcount decremented) only once (1) the mapping that
//! dropped it is on disk — the flush generation that wrote it has completed — and (2) no
//! request that could still do IO to the cluster through the old mapping is running — every
//! request from the epoch of the drop or earlier has finished (`alloc/epochs.rs`).

#![deny(clippy::cast_possible_truncation)]

use std::sync::Mutex;

use crate::alloc::Epochs;
use crate::units::HostOffset;

/// A host cluster reference to drop once the mapping that dropped it is on disk.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PendingFree {
    /// Host cluster offset.
    pub host: HostOffset,
    /// Punch the host space when the refcount reaches zero.
    pub punch: bool,
    /// Request epoch when the mapping dropped the reference.
    epoch: u64,
    /// The flush generation that persists the dropping mapping.
    generation: u64,
}

/// The list of pending frees.
#[derive(Debug, Default)]
pub(crate) struct PendingFrees {
    list: Mutex<Vec<PendingFree>>,
}

impl PendingFrees {
    /// Record that a mapping dropped its reference to `host` in request epoch `epoch`; the
    /// flush of generation `generation` persists that mapping.
    pub fn push(&self, host: HostOffset, punch: bool, (epoch, generation): (u64, u64)) {
        self.list.lock().unwrap().push(PendingFree {
            host,
            punch,
            epoch,
            generation,
        });
    }

    /// Take the frees that are safe now: persisted by a flush of generation ≤ `upto`, and
    /// quiesced in `epochs`. The others stay.
    pub fn take_ready(&self, upto: u64, epochs: &Epochs) -> Vec<PendingFree> {
        let mut list = self.list.lock().unwrap();
        let (ready, keep): (Vec<_>, Vec<_>) = list
            .drain(..)
            .partition(|f| f.generation <= upto && epochs.quiesced(f.epoch));
        *list = keep;
        ready
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_free_waits_for_its_flush_and_its_readers() {
        let epochs = Epochs::new();
        let frees = PendingFrees::default();
        let reader = epochs.enter();
        let e = epochs.stamp();
        frees.push(HostOffset(4096), false, (e, 2));
        assert!(
            frees.take_ready(1, &epochs).is_empty(),
            "mapping not on disk yet"
        );
        assert!(
            frees.take_ready(2, &epochs).is_empty(),
            "a reader may still use it"
        );
        drop(reader);
        let ready = frees.take_ready(2, &epochs);
        assert_eq!(ready.iter().map(|f| f.host.0).collect::<Vec<_>>(), [4096]);
        assert!(frees.take_ready(2, &epochs).is_empty(), "taken once");
    }
}
