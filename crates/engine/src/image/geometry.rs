//! Fixed numbers derived from the header: cluster size, L2 layout, slice size, and the index
//! arithmetic that turns a guest offset into an L1 index, an L2 index and a cache slice.

use crate::format::l2::L2Geometry;
use crate::units::{GuestCluster, GuestOffset, HostOffset, to_usize};

/// Layout constants of one open image.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Geometry {
    pub cluster_bits: u32,
    pub cluster_size: u64,
    pub l2: L2Geometry,
    /// Entries per L2 table.
    pub l2_entries: u64,
    /// Bytes per L2 entry (8 or 16).
    pub entry_size: u64,
    /// Bytes per cache slice (≤ cluster size).
    pub slice_size: u64,
}

impl Geometry {
    pub fn new(cluster_bits: u32, extended: bool, version3: bool, slice: usize) -> Self {
        let l2 = L2Geometry {
            cluster_bits,
            extended,
            version3,
        };
        let cluster_size = 1u64 << cluster_bits;
        let entry_size = if extended { 16 } else { 8 };
        let slice_size = (slice.next_power_of_two() as u64).clamp(512, cluster_size);
        Geometry {
            cluster_bits,
            cluster_size,
            l2,
            l2_entries: cluster_size / entry_size,
            entry_size,
            slice_size,
        }
    }

    /// Guest cluster number of a guest offset.
    pub fn guest_cluster(&self, guest: GuestOffset) -> GuestCluster {
        guest.cluster(self.cluster_bits)
    }

    /// Guest offset where guest cluster `gc` starts.
    pub fn cluster_start(&self, gc: GuestCluster) -> GuestOffset {
        gc.offset(self.cluster_bits)
    }

    /// Offset of a guest offset within its cluster (the same within the host cluster it maps
    /// to, since host clusters are cluster-aligned).
    pub fn in_cluster(&self, off: GuestOffset) -> u64 {
        off.0 & (self.cluster_size - 1)
    }

    /// L1 index of a guest cluster.
    pub fn l1_index(&self, gc: GuestCluster) -> usize {
        to_usize(gc.0 / self.l2_entries)
    }

    /// Index in its L2 table of a guest cluster.
    pub fn l2_index(&self, gc: GuestCluster) -> u64 {
        gc.0 % self.l2_entries
    }

    /// Entries in one cache slice.
    pub fn slice_entries(&self) -> u64 {
        self.slice_size / self.entry_size
    }

    /// Host offset of the slice holding L2 entry `l2_index` of the table at `l2_table`, and
    /// the entry's index within that slice.
    pub fn l2_slice(&self, l2_table: HostOffset, l2_index: u64) -> (HostOffset, usize) {
        let per = self.slice_entries();
        (
            l2_table.offset_by((l2_index / per) * self.slice_size),
            to_usize(l2_index % per),
        )
    }

    /// Size of a subcluster (the cluster size without extended L2).
    pub fn subcluster_size(&self) -> u64 {
        self.cluster_size / u64::from(self.l2.subclusters())
    }

    /// Round guest offset `off` down to a cluster boundary.
    pub fn cluster_floor(&self, off: GuestOffset) -> GuestOffset {
        GuestOffset(off.0 & !(self.cluster_size - 1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 64 KiB clusters, standard L2: 8192 entries per table, 4 KiB slices of 512 entries.
    #[test]
    fn guest_offset_to_l1_l2_and_slice() {
        let geo = Geometry::new(16, false, true, 4096);
        let off = GuestOffset((8192 + 513) * 0x1_0000 + 0x123);
        let gc = geo.guest_cluster(off);
        assert_eq!(gc, GuestCluster(8192 + 513));
        assert_eq!(geo.in_cluster(off), 0x123);
        assert_eq!(geo.cluster_floor(off), geo.cluster_start(gc));
        assert_eq!((geo.l1_index(gc), geo.l2_index(gc)), (1, 513));
        let (slice, idx) = geo.l2_slice(HostOffset(0x5_0000), geo.l2_index(gc));
        assert_eq!((slice, idx), (HostOffset(0x5_1000), 1));
    }

    /// Extended L2 entries are 16 bytes: half as many per table and per slice.
    #[test]
    fn extended_entries_halve_the_fan_out() {
        let geo = Geometry::new(16, true, true, 4096);
        let gc = GuestCluster(4096 + 300);
        assert_eq!((geo.l1_index(gc), geo.l2_index(gc)), (1, 300));
        let (slice, idx) = geo.l2_slice(HostOffset(0x5_0000), 300);
        assert_eq!((slice, idx), (HostOffset(0x5_1000), 44));
    }
}
