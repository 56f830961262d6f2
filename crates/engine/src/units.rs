//! Newtypes for the offsets qcow2 code juggles. Mixing a guest offset with a host offset is the
//! classic qcow2 bug; distinct types let the compiler catch it.

use std::fmt;

/// A byte offset in the virtual disk the guest sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct GuestOffset(pub u64);

/// A byte offset in the image file (or the external data file).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct HostOffset(pub u64);

impl fmt::Display for GuestOffset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "guest {:#x}", self.0)
    }
}

impl fmt::Display for HostOffset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "host {:#x}", self.0)
    }
}

impl HostOffset {
    /// The offset `n` bytes further on.
    pub fn offset_by(self, n: u64) -> HostOffset {
        HostOffset(self.0 + n)
    }
}

impl GuestOffset {
    /// The offset `n` bytes further on.
    pub fn offset_by(self, n: u64) -> GuestOffset {
        GuestOffset(self.0 + n)
    }
}
