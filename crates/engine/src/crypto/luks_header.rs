//! The LUKS1 header (the published LUKS1 on-disk format), as QEMU stores it inside a qcow2
//! image at the offset the full disk encryption header extension gives. Pure: bytes in,
//! value or error out. All integers are big-endian; strings are NUL-padded.
//!
//! ```text
//!  offset size field
//!  0      6    magic "LUKS\xba\xbe"
//!  6      2    version (1)
//!  8      32   cipher name ("aes")
//!  40     32   cipher mode ("xts-plain64", "cbc-essiv:sha256")
//!  72     32   hash spec ("sha256"): PBKDF2 and anti-forensic splitter hash
//!  104    4    payload offset, in 512-byte sectors (for qcow2: the header's length)
//!  108    4    master key bytes
//!  112    20   master key digest: PBKDF2(master key, digest salt, digest iterations)
//!  132    32   master key digest salt
//!  164    4    master key digest iterations
//!  168    40   UUID (text)
//!  208    8×48 key slots:
//!               +0  4  active (0x00ac71f3) or inactive (0x0000dead)
//!               +4  4  PBKDF2 iterations
//!               +8  32 salt
//!               +40 4  key material offset, in sectors from the header's start
//!               +44 4  anti-forensic stripes
//!  592         end
//! ```

use crate::error::{Error, Result};

/// LUKS1 magic.
pub const MAGIC: &[u8; 6] = b"LUKS\xba\xbe";
/// Length of the header proper (before the key material).
pub const HEADER_LEN: usize = 592;
/// Number of key slots.
pub const SLOTS: usize = 8;
/// Key slot `active` value.
pub const SLOT_ACTIVE: u32 = 0x00ac_71f3;
/// Key slot `inactive` value.
pub const SLOT_INACTIVE: u32 = 0x0000_dead;
/// Length of the master key digest.
pub const DIGEST_LEN: usize = 20;
/// Length of salts.
pub const SALT_LEN: usize = 32;

const CIPHER_NAME: usize = 8;
const CIPHER_MODE: usize = CIPHER_NAME + 32;
const HASH_SPEC: usize = CIPHER_MODE + 32;
const PAYLOAD_OFFSET: usize = HASH_SPEC + 32;
const KEY_BYTES: usize = PAYLOAD_OFFSET + 4;
const MK_DIGEST: usize = KEY_BYTES + 4;
const MK_SALT: usize = MK_DIGEST + DIGEST_LEN;
const MK_ITERS: usize = MK_SALT + SALT_LEN;
const UUID: usize = MK_ITERS + 4;
const SLOT_AREA: usize = UUID + 40;
const SLOT_LEN: usize = 48;

/// The most PBKDF2 iterations accepted: a hostile header must not make an open spin for
/// hours (QEMU's 2-second default on a fast machine gives a few million).
pub const MAX_ITERATIONS: u32 = 1 << 27;
/// The most key material bytes one slot may have (QEMU: 64-byte keys × 4000 stripes = 250 KiB).
pub const MAX_KEY_MATERIAL: u64 = 16 << 20;

/// One key slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySlot {
    /// Holds a copy of the master key.
    pub active: bool,
    /// PBKDF2 iterations for this slot's passphrase.
    pub iterations: u32,
    /// PBKDF2 salt.
    pub salt: [u8; SALT_LEN],
    /// Key material offset, in 512-byte sectors from the header's start.
    pub key_offset: u32,
    /// Anti-forensic stripes.
    pub stripes: u32,
}

/// A parsed LUKS1 header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LuksHeader {
    /// `cipher-name`.
    pub cipher_name: String,
    /// `cipher-mode`.
    pub cipher_mode: String,
    /// `hash-spec`.
    pub hash_spec: String,
    /// Payload offset in sectors.
    pub payload_offset: u32,
    /// Master key length.
    pub key_bytes: u32,
    /// Master key digest.
    pub mk_digest: [u8; DIGEST_LEN],
    /// Master key digest salt.
    pub mk_salt: [u8; SALT_LEN],
    /// Master key digest iterations.
    pub mk_iterations: u32,
    /// UUID text.
    pub uuid: String,
    /// The key slots.
    pub slots: [KeySlot; SLOTS],
}

fn be32(b: &[u8], at: usize) -> u32 {
    let mut x = [0u8; 4];
    x.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(x)
}

fn text(b: &[u8]) -> Result<String> {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8(b[..end].to_vec())
        .map_err(|_| Error::invalid("LUKS header: text field is not UTF-8"))
}

fn put_text(b: &mut [u8], s: &str) -> Result<()> {
    if s.len() >= b.len() {
        return Err(Error::invalid_arg(format!("LUKS header: '{s}' too long")));
    }
    b[..s.len()].copy_from_slice(s.as_bytes());
    Ok(())
}

impl KeySlot {
    fn parse(b: &[u8]) -> Result<KeySlot> {
        let active = match be32(b, 0) {
            SLOT_ACTIVE => true,
            SLOT_INACTIVE => false,
            x => return Err(Error::invalid(format!("LUKS key slot state {x:#x}"))),
        };
        let mut salt = [0u8; SALT_LEN];
        salt.copy_from_slice(&b[8..8 + SALT_LEN]);
        Ok(KeySlot {
            active,
            iterations: be32(b, 4),
            salt,
            key_offset: be32(b, 40),
            stripes: be32(b, 44),
        })
    }

    fn write(&self, b: &mut [u8]) {
        let state = if self.active {
            SLOT_ACTIVE
        } else {
            SLOT_INACTIVE
        };
        b[0..4].copy_from_slice(&state.to_be_bytes());
        b[4..8].copy_from_slice(&self.iterations.to_be_bytes());
        b[8..8 + SALT_LEN].copy_from_slice(&self.salt);
        b[40..44].copy_from_slice(&self.key_offset.to_be_bytes());
        b[44..48].copy_from_slice(&self.stripes.to_be_bytes());
    }
}

impl LuksHeader {
    /// Parse and validate the first [`HEADER_LEN`] bytes of `b`; `region` is the length the
    /// qcow2 extension gives the whole LUKS area (every slot's key material must lie inside).
    pub fn parse(b: &[u8], region: u64) -> Result<LuksHeader> {
        if b.len() < HEADER_LEN || &b[..6] != MAGIC {
            return Err(Error::invalid("LUKS header: bad magic"));
        }
        let version = u16::from_be_bytes([b[6], b[7]]);
        if version != 1 {
            return Err(Error::unsupported(format!("LUKS version {version}")));
        }
        let mut mk_digest = [0u8; DIGEST_LEN];
        mk_digest.copy_from_slice(&b[MK_DIGEST..MK_SALT]);
        let mut mk_salt = [0u8; SALT_LEN];
        mk_salt.copy_from_slice(&b[MK_SALT..MK_ITERS]);
        let mut slots = Vec::with_capacity(SLOTS);
        for i in 0..SLOTS {
            let at = SLOT_AREA + i * SLOT_LEN;
            slots.push(KeySlot::parse(&b[at..at + SLOT_LEN])?);
        }
        let h = LuksHeader {
            cipher_name: text(&b[CIPHER_NAME..CIPHER_MODE])?,
            cipher_mode: text(&b[CIPHER_MODE..HASH_SPEC])?,
            hash_spec: text(&b[HASH_SPEC..PAYLOAD_OFFSET])?,
            payload_offset: be32(b, PAYLOAD_OFFSET),
            key_bytes: be32(b, KEY_BYTES),
            mk_digest,
            mk_salt,
            mk_iterations: be32(b, MK_ITERS),
            uuid: text(&b[UUID..SLOT_AREA])?,
            slots: slots
                .try_into()
                .map_err(|_| Error::invalid("LUKS header: key slots"))?,
        };
        h.validate(region)?;
        Ok(h)
    }

    fn validate(&self, region: u64) -> Result<()> {
        if !(16..=64).contains(&self.key_bytes) {
            return Err(Error::invalid(format!(
                "LUKS master key of {} bytes",
                self.key_bytes
            )));
        }
        if self.mk_iterations == 0 || self.mk_iterations > MAX_ITERATIONS {
            return Err(Error::invalid(format!(
                "LUKS master key digest iterations {}",
                self.mk_iterations
            )));
        }
        for (i, s) in self.slots.iter().enumerate().filter(|(_, s)| s.active) {
            let len = self.material_len(s);
            let start = u64::from(s.key_offset) * 512;
            let bad = s.iterations == 0
                || s.iterations > MAX_ITERATIONS
                || s.stripes == 0
                || len > MAX_KEY_MATERIAL
                || start < HEADER_LEN as u64
                || start + len > region;
            if bad {
                return Err(Error::invalid(format!("LUKS key slot {i} is malformed")));
            }
        }
        Ok(())
    }

    /// Bytes of key material of slot `s` (key bytes × stripes).
    pub fn material_len(&self, s: &KeySlot) -> u64 {
        u64::from(self.key_bytes) * u64::from(s.stripes)
    }

    /// Encode into the first [`HEADER_LEN`] bytes of `b`.
    pub fn write(&self, b: &mut [u8]) -> Result<()> {
        b[..HEADER_LEN].fill(0);
        b[..6].copy_from_slice(MAGIC);
        b[6..8].copy_from_slice(&1u16.to_be_bytes());
        put_text(&mut b[CIPHER_NAME..CIPHER_MODE], &self.cipher_name)?;
        put_text(&mut b[CIPHER_MODE..HASH_SPEC], &self.cipher_mode)?;
        put_text(&mut b[HASH_SPEC..PAYLOAD_OFFSET], &self.hash_spec)?;
        b[PAYLOAD_OFFSET..KEY_BYTES].copy_from_slice(&self.payload_offset.to_be_bytes());
        b[KEY_BYTES..MK_DIGEST].copy_from_slice(&self.key_bytes.to_be_bytes());
        b[MK_DIGEST..MK_SALT].copy_from_slice(&self.mk_digest);
        b[MK_SALT..MK_ITERS].copy_from_slice(&self.mk_salt);
        b[MK_ITERS..UUID].copy_from_slice(&self.mk_iterations.to_be_bytes());
        put_text(&mut b[UUID..SLOT_AREA], &self.uuid)?;
        for (i, s) in self.slots.iter().enumerate() {
            let at = SLOT_AREA + i * SLOT_LEN;
            s.write(&mut b[at..at + SLOT_LEN]);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> LuksHeader {
        let slot = |i: u32, active| KeySlot {
            active,
            iterations: if active { 1000 } else { 0 },
            salt: [i as u8; SALT_LEN],
            key_offset: 8 + i * 504,
            stripes: 4000,
        };
        LuksHeader {
            cipher_name: "aes".into(),
            cipher_mode: "xts-plain64".into(),
            hash_spec: "sha256".into(),
            payload_offset: 4040,
            key_bytes: 64,
            mk_digest: [1; DIGEST_LEN],
            mk_salt: [2; SALT_LEN],
            mk_iterations: 1000,
            uuid: "4a1692f2-6925-4675-84b6-bf9b27f14540".into(),
            slots: std::array::from_fn(|i| slot(i as u32, i == 0)),
        }
    }

    #[test]
    fn round_trip() {
        let h = sample();
        let mut b = vec![0u8; HEADER_LEN];
        h.write(&mut b).unwrap();
        assert_eq!(&b[..6], MAGIC);
        assert_eq!(&b[40..51], b"xts-plain64");
        assert_eq!(be32(&b, 104), 4040);
        assert_eq!(be32(&b, 208), SLOT_ACTIVE);
        assert_eq!(be32(&b, 208 + 40), 8);
        assert_eq!(be32(&b, 208 + 48), SLOT_INACTIVE);
        assert_eq!(LuksHeader::parse(&b, 4040 * 512).unwrap(), h);
    }

    #[test]
    fn rejects_malformed_fields() {
        let mut b = vec![0u8; HEADER_LEN];
        sample().write(&mut b).unwrap();
        let bad = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut c = b.clone();
            f(&mut c);
            LuksHeader::parse(&c, 4040 * 512).unwrap_err()
        };
        bad(&|c| c[0] = b'X');
        bad(&|c| c[7] = 2);
        bad(&|c| c[108..112].copy_from_slice(&1000u32.to_be_bytes()));
        bad(&|c| c[164..168].copy_from_slice(&u32::MAX.to_be_bytes()));
        bad(&|c| c[208..212].copy_from_slice(&7u32.to_be_bytes()));
        // Slot 0's key material past the LUKS area, or over the header itself.
        bad(&|c| c[248..252].copy_from_slice(&4039u32.to_be_bytes()));
        bad(&|c| c[248..252].copy_from_slice(&0u32.to_be_bytes()));
        bad(&|c| c[252..256].copy_from_slice(&u32::MAX.to_be_bytes()));
        assert!(LuksHeader::parse(&b[..100], 1 << 20).is_err());
    }
}
