//! The active L1 table in memory: its entries, where it lives on disk, and which entries
//! changed since the last flush.
//!
//! Two locks inside, both `std` and never held across an `.await` (LOCKS.md): the entries
//! and offset (lock 5, a `RwLock`: lookups read it on every request) and the dirty-index set
//! (a leaf, lock 7). A writer publishes an entry before marking it dirty, and a flush takes
//! the dirty set before copying the entries, so a flush either sees the new entry or leaves
//! it dirty for the next one.

use std::collections::BTreeSet;
use std::sync::{Mutex, RwLock};

use crate::format::l1::{self, L1Entry};
use crate::units::HostOffset;

/// L1 entries per 512-byte sector: the unit a flush writes.
const ENTRIES_PER_SECTOR: usize = 512 / l1::L1E_SIZE;

/// The entries and the table's place, changed together by [`L1Table::grow`].
#[derive(Debug)]
struct Entries {
    entries: Vec<L1Entry>,
    offset: HostOffset,
}

/// The active L1 table (see the module comment).
#[derive(Debug)]
pub(crate) struct L1Table {
    table: RwLock<Entries>,
    dirty: Mutex<BTreeSet<usize>>,
}

/// One 512-byte sector of the table as encoded at snapshot time: (sector index, bytes).
pub(crate) type L1Sector = (usize, Vec<u8>);

impl L1Table {
    /// The table read at open: `entries`, stored at `offset`, nothing dirty.
    pub fn new(entries: Vec<L1Entry>, offset: HostOffset) -> L1Table {
        L1Table {
            table: RwLock::new(Entries { entries, offset }),
            dirty: Mutex::new(BTreeSet::new()),
        }
    }

    /// Entry `idx`, or `None` past the end of the table.
    pub fn get(&self, idx: usize) -> Option<L1Entry> {
        self.table.read().unwrap().entries.get(idx).copied()
    }

    /// The number of entries.
    pub fn len(&self) -> usize {
        self.table.read().unwrap().entries.len()
    }

    /// Where the table lives in the image file.
    pub fn offset(&self) -> HostOffset {
        self.table.read().unwrap().offset
    }

    /// Set entry `idx` and mark it dirty (the next flush writes it). `false` if `idx` is past
    /// the end of the table (nothing changes).
    pub fn set(&self, idx: usize, entry: L1Entry) -> bool {
        {
            let mut t = self.table.write().unwrap();
            let Some(slot) = t.entries.get_mut(idx) else {
                return false;
            };
            *slot = entry;
        }
        self.mark_dirty([idx]);
        true
    }

    /// Mark entries dirty (again): a flush that took them did not write them.
    pub fn mark_dirty(&self, idx: impl IntoIterator<Item = usize>) {
        self.dirty.lock().unwrap().extend(idx);
    }

    /// Whether any entry changed since the last flush took the dirty set.
    pub fn has_dirty(&self) -> bool {
        !self.dirty.lock().unwrap().is_empty()
    }

    /// Take the dirty set, and copies of the 512-byte sectors holding those entries as they
    /// are now (what the flush writes).
    pub fn take_dirty(&self) -> (BTreeSet<usize>, Vec<L1Sector>) {
        let dirty = std::mem::take(&mut *self.dirty.lock().unwrap());
        let mut sectors: Vec<usize> = dirty.iter().map(|i| i / ENTRIES_PER_SECTOR).collect();
        sectors.dedup();
        let t = self.table.read().unwrap();
        let sectors = sectors
            .into_iter()
            .map(|sec| (sec, encode_sector(&t.entries, sec)))
            .collect();
        (dirty, sectors)
    }

    /// A copy of every entry (snapshot operations work on the whole table).
    pub fn entries(&self) -> Vec<L1Entry> {
        self.table.read().unwrap().entries.clone()
    }

    /// Replace every entry: the caller already wrote `entries` over the table on disk (in
    /// place) or is a read-only view, so nothing is left dirty.
    pub fn replace(&self, entries: Vec<L1Entry>) {
        let offset = self.offset();
        self.switch(entries, offset, || ());
    }

    /// Switch to `entries` stored at `offset` (a new table, already on disk), running `also`
    /// while the table lock is held so readers see the table and what `also` changes (the
    /// in-memory header) together. Nothing is left dirty.
    pub fn switch(&self, entries: Vec<L1Entry>, offset: HostOffset, also: impl FnOnce()) {
        let mut t = self.table.write().unwrap();
        *t = Entries { entries, offset };
        self.dirty.lock().unwrap().clear();
        also();
    }

    /// Switch to a table of `len` entries at `offset` (resize moved it there): existing
    /// entries keep their values, new ones are empty.
    pub fn grow(&self, len: usize, offset: HostOffset) {
        let mut t = self.table.write().unwrap();
        t.entries.resize(len, L1Entry::default());
        t.offset = offset;
    }
}

/// The bytes of sector `sec` of `entries` (shorter for the last, partial sector).
fn encode_sector(entries: &[L1Entry], sec: usize) -> Vec<u8> {
    let start = sec * ENTRIES_PER_SECTOR;
    let end = (start + ENTRIES_PER_SECTOR).min(entries.len());
    let part = entries.get(start..end).unwrap_or_default();
    let mut buf = vec![0u8; part.len() * l1::L1E_SIZE];
    l1::write_table(part, &mut buf);
    buf
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(n: usize) -> L1Table {
        L1Table::new(vec![L1Entry::default(); n], HostOffset(0x30000))
    }

    #[test]
    fn set_marks_dirty_and_take_encodes_the_sector() {
        let t = table(100);
        assert!(t.set(70, L1Entry::new(HostOffset(0x50000), true)));
        assert!(t.has_dirty());
        let (dirty, sectors) = t.take_dirty();
        assert_eq!(dirty.into_iter().collect::<Vec<_>>(), vec![70]);
        assert!(!t.has_dirty());
        // Entry 70 is in sector 1, which holds entries 64..100 (36 entries).
        assert_eq!(sectors.len(), 1);
        let (sec, bytes) = &sectors[0];
        assert_eq!(*sec, 1);
        assert_eq!(bytes.len(), 36 * 8);
        let at = (70 - 64) * 8;
        assert_eq!(bytes[at..at + 8], (0x8000_0000_0005_0000u64).to_be_bytes());
    }

    #[test]
    fn set_past_the_end_changes_nothing() {
        let t = table(2);
        assert!(!t.set(2, L1Entry(0x10000)));
        assert!(!t.has_dirty());
    }

    #[test]
    fn dirty_entries_in_one_sector_give_one_copy() {
        let t = table(64);
        t.set(1, L1Entry(0x10000));
        t.set(5, L1Entry(0x20000));
        let (dirty, sectors) = t.take_dirty();
        assert_eq!(dirty.len(), 2);
        assert_eq!(sectors.len(), 1);
        assert_eq!(sectors[0].1.len(), 512);
    }

    #[test]
    fn grow_keeps_entries_and_moves_the_table() {
        let t = table(2);
        t.set(1, L1Entry(0x10000));
        t.grow(10, HostOffset(0x90000));
        assert_eq!((t.len(), t.offset()), (10, HostOffset(0x90000)));
        assert_eq!(t.get(1), Some(L1Entry(0x10000)));
        assert_eq!(t.get(9), Some(L1Entry::default()));
        assert!(t.has_dirty());
    }
}
