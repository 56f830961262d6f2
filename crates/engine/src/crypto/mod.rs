//! Encrypted images (feature `luks`): QEMU's LUKS-in-qcow2 (`crypt_method` 2) and legacy
//! AES (`crypt_method` 1, read only).
//!
//! Guest data is encrypted per 512-byte sector. The sector number each IV is made from is
//! the sector's **host** offset / 512 for LUKS (the qcow2 spec: "the data is encrypted with
//! the sector number of the host cluster offset") and its **guest** offset / 512 for legacy
//! AES, as QEMU does (`crypt_physical_offset`). LUKS data therefore goes through
//! `CryptStorage`, a storage wrapper that encrypts on the way out and decrypts on the way
//! in; legacy AES is decrypted in the read path, where the guest offset is known.
//!
//! Keys live in zeroizing memory and are never printed (`Debug` of every key holder is
//! opaque).

mod af;
pub mod amend;
pub mod cipher;
pub mod hash;
pub mod luks;
pub mod luks_header;
mod open;
mod storage;

pub use cipher::{CipherAlg, CipherMode, CipherSpec, IvGen, SectorCipher};
pub use hash::HashAlg;
pub use luks::LuksParams;
pub(crate) use open::{ImageCrypto, open_crypto};
pub(crate) use storage::CryptStorage;

use zeroize::Zeroizing;

/// A passphrase (QEMU's `secret` object), held in memory that is wiped when dropped.
#[derive(Clone)]
pub struct Secret(Zeroizing<Vec<u8>>);

impl Secret {
    /// A secret from its bytes.
    pub fn new(bytes: impl Into<Vec<u8>>) -> Secret {
        Secret(Zeroizing::new(bytes.into()))
    }

    /// The secret's bytes.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}
