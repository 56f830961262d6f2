//! LUKS1 key handling: unlock the master key with a passphrase (try each active key slot:
//! PBKDF2 the passphrase into a slot key, decrypt the slot's key material, merge the
//! anti-forensic stripes, check the result against the master key digest), and build a new
//! LUKS area (header + key material for slot 0) for `create`.
//!
//! Everything here is CPU work (PBKDF2 runs for as long as the header's iteration counts
//! ask), so callers run it off the async executor.

use std::time::{Duration, Instant};

use zeroize::Zeroizing;

use super::af;
use super::cipher::{CipherSpec, SECTOR, SectorCipher};
use super::hash::HashAlg;
use super::luks_header::{
    DIGEST_LEN, HEADER_LEN, KeySlot, LuksHeader, MAX_ITERATIONS, SALT_LEN, SLOTS,
};
use crate::error::{Error, ErrorKind, Result};

/// Anti-forensic stripes per key slot (LUKS1's fixed choice, as QEMU and cryptsetup use).
pub const STRIPES: u32 = 4000;
/// Key material of each slot is aligned to this many bytes (QEMU's and cryptsetup's layout).
const KEY_ALIGN: u64 = 4096;
/// Fewest PBKDF2 iterations a new slot or digest gets, however fast the machine.
const MIN_ITERATIONS: u32 = 1000;

/// What a new LUKS area uses: QEMU's `encrypt.*` create options.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LuksParams {
    /// Cipher, mode and IV generator (default aes-256-xts-plain64).
    pub spec: CipherSpec,
    /// PBKDF2 / splitter hash (default sha256).
    pub hash: HashAlg,
    /// Time PBKDF2 should take per unlock, in milliseconds (default 2000).
    pub iter_time_ms: u64,
}

impl Default for LuksParams {
    fn default() -> Self {
        LuksParams {
            spec: CipherSpec {
                alg: super::cipher::CipherAlg::Aes256,
                mode: super::cipher::CipherMode::Xts,
                ivgen: super::cipher::IvGen::Plain64,
            },
            hash: HashAlg::Sha256,
            iter_time_ms: 2000,
        }
    }
}

/// An unlocked LUKS area: its header and the master key.
pub(crate) struct Unlocked {
    pub header: LuksHeader,
    pub spec: CipherSpec,
    pub hash: HashAlg,
    pub master: Zeroizing<Vec<u8>>,
}

/// The cipher and hash a header names.
pub(crate) fn algorithms(h: &LuksHeader) -> Result<(CipherSpec, HashAlg)> {
    let key_bytes = usize::try_from(h.key_bytes).unwrap_or(0);
    let spec = CipherSpec::from_luks(&h.cipher_name, &h.cipher_mode, key_bytes)?;
    Ok((spec, HashAlg::parse(&h.hash_spec)?))
}

impl std::fmt::Debug for Unlocked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the master key.
        f.debug_struct("Unlocked")
            .field("spec", &self.spec)
            .finish_non_exhaustive()
    }
}

/// Try every active slot with `secret`. `material[i]` is slot `i`'s key material (empty for
/// inactive slots).
pub(crate) fn unlock(h: &LuksHeader, material: &[Vec<u8>], secret: &[u8]) -> Result<Unlocked> {
    let (spec, hash) = algorithms(h)?;
    for (slot, m) in h.slots.iter().zip(material) {
        if !slot.active {
            continue;
        }
        let master = open_slot(slot, m, (spec, hash), secret)?;
        if digest_matches(h, hash, &master) {
            return Ok(Unlocked {
                header: h.clone(),
                spec,
                hash,
                master,
            });
        }
    }
    Err(Error::new(
        ErrorKind::InvalidArgument,
        "Invalid password, cannot unlock any keyslot",
    ))
}

/// The master key candidate that `secret` gives for `slot`.
fn open_slot(
    slot: &KeySlot,
    material: &[u8],
    (spec, hash): (CipherSpec, HashAlg),
    secret: &[u8],
) -> Result<Zeroizing<Vec<u8>>> {
    let n = spec.key_len();
    let mut slot_key = Zeroizing::new(vec![0u8; n]);
    hash.pbkdf2(secret, &slot.salt, slot.iterations, &mut slot_key);
    if material.len() % 16 != 0 {
        return Err(Error::invalid(
            "LUKS key material is not a whole number of blocks",
        ));
    }
    let mut split = Zeroizing::new(material.to_vec());
    SectorCipher::new(&spec, &slot_key)?.decrypt(&mut split, 0);
    Ok(af::merge(hash, &split, n))
}

fn digest_matches(h: &LuksHeader, hash: HashAlg, master: &[u8]) -> bool {
    let mut d = [0u8; DIGEST_LEN];
    hash.pbkdf2(master, &h.mk_salt, h.mk_iterations, &mut d);
    d == h.mk_digest
}

/// QEMU en/decrypts key material in whole 512-byte sectors and aborts on a short last one
/// (aes-192-cbc: 24-byte keys × 4000 stripes), so such an area is never created.
pub(crate) fn check_creatable(key_len: usize) -> Result<()> {
    if (key_len * STRIPES as usize) % SECTOR != 0 {
        return Err(Error::unsupported(format!(
            "a {key_len}-byte LUKS key (its key material is not whole sectors: QEMU cannot open it)"
        )));
    }
    Ok(())
}

/// Fill `buf` from the OS's random source.
pub(crate) fn random(buf: &mut [u8]) -> Result<()> {
    getrandom::fill(buf).map_err(|e| {
        Error::io(
            "reading random bytes for a key",
            std::io::Error::other(e.to_string()),
        )
    })
}

/// Sectors of one slot's key material, aligned as QEMU lays it out.
fn slot_sectors(key_bytes: u64) -> u64 {
    (key_bytes * u64::from(STRIPES)).div_ceil(KEY_ALIGN) * KEY_ALIGN / SECTOR as u64
}

/// PBKDF2 iterations with `hash` that take about `ms` milliseconds on this machine.
fn calibrate(hash: HashAlg, ms: u64) -> u32 {
    let mut n = 1000u32;
    let mut out = [0u8; 32];
    loop {
        let t = Instant::now();
        hash.pbkdf2(b"calibration", &[0u8; SALT_LEN], n, &mut out);
        let el = t.elapsed();
        if el >= Duration::from_millis(20) || n >= MAX_ITERATIONS / 4 {
            let per_ms = f64::from(n) / el.as_secs_f64().max(1e-6) / 1000.0;
            let want = per_ms * ms as f64;
            // Clamped to the u32 range below, so the truncating cast is exact enough.
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            let want = want.clamp(0.0, f64::from(MAX_ITERATIONS / 2)) as u32;
            return want.max(MIN_ITERATIONS);
        }
        n *= 2;
    }
}

/// A fresh random UUID (version 4) in text form.
fn new_uuid() -> Result<String> {
    let mut b = [0u8; 16];
    random(&mut b)?;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: Vec<String> = b.iter().map(|x| format!("{x:02x}")).collect();
    Ok(format!(
        "{}-{}-{}-{}-{}",
        hex[0..4].concat(),
        hex[4..6].concat(),
        hex[6..8].concat(),
        hex[8..10].concat(),
        hex[10..16].concat()
    ))
}

/// A new LUKS area: header and slot 0 keyed with `secret`, the other slots inactive, laid
/// out as QEMU does (key material from 4 KiB on, each slot 4 KiB aligned). Returns the
/// area's bytes (its length is the payload offset) and the master key.
pub(crate) fn build(p: &LuksParams, secret: &[u8]) -> Result<(Vec<u8>, Zeroizing<Vec<u8>>)> {
    let key_len = p.spec.key_len();
    check_creatable(key_len)?;
    let mut master = Zeroizing::new(vec![0u8; key_len]);
    random(&mut master)?;
    let per_slot = slot_sectors(key_len as u64);
    let first = KEY_ALIGN / SECTOR as u64;
    let payload = first + SLOTS as u64 * per_slot;
    let to32 = |x: u64| u32::try_from(x).map_err(|_| Error::invalid_arg("LUKS area too large"));
    let iters = calibrate(p.hash, p.iter_time_ms);
    let mut h = LuksHeader {
        cipher_name: "aes".into(),
        cipher_mode: p.spec.luks_mode(),
        hash_spec: p.hash.name().into(),
        payload_offset: to32(payload)?,
        key_bytes: to32(key_len as u64)?,
        mk_digest: [0; DIGEST_LEN],
        mk_salt: [0; SALT_LEN],
        mk_iterations: (iters / 4).max(MIN_ITERATIONS),
        uuid: new_uuid()?,
        slots: std::array::from_fn(|_| KeySlot {
            active: false,
            iterations: 0,
            salt: [0; SALT_LEN],
            key_offset: 0,
            stripes: STRIPES,
        }),
    };
    for (i, s) in h.slots.iter_mut().enumerate() {
        s.key_offset = to32(first + i as u64 * per_slot)?;
    }
    random(&mut h.mk_salt)?;
    p.hash
        .pbkdf2(&master, &h.mk_salt, h.mk_iterations, &mut h.mk_digest);
    let mut area = vec![0u8; usize::try_from(payload * SECTOR as u64).unwrap_or(0)];
    let material = seal_slot(&mut h, 0, (p.spec, p.hash), &master, secret, iters)?;
    let at = h.slots[0].key_offset as usize * SECTOR;
    area[at..at + material.len()].copy_from_slice(&material);
    h.write(&mut area[..HEADER_LEN])?;
    Ok((area, master))
}

/// Make slot `i` active for `secret`: a fresh salt, `iters` iterations, and the master key
/// split and encrypted with the slot key. Returns the key material to write at the slot's
/// offset.
pub(crate) fn seal_slot(
    h: &mut LuksHeader,
    i: usize,
    (spec, hash): (CipherSpec, HashAlg),
    master: &[u8],
    secret: &[u8],
    iters: u32,
) -> Result<Zeroizing<Vec<u8>>> {
    let slot = &mut h.slots[i];
    random(&mut slot.salt)?;
    slot.iterations = iters;
    slot.stripes = STRIPES;
    slot.active = true;
    let mut slot_key = Zeroizing::new(vec![0u8; master.len()]);
    hash.pbkdf2(secret, &slot.salt, iters, &mut slot_key);
    let stripes = STRIPES as usize;
    let mut split = af::split(hash, master, stripes, random)?;
    SectorCipher::new(&spec, &slot_key)?.encrypt(&mut split, 0);
    Ok(split)
}

/// The PBKDF2 iterations a new slot gets for `iter_time_ms`.
pub(crate) fn slot_iterations(hash: HashAlg, iter_time_ms: u64) -> u32 {
    calibrate(hash, iter_time_ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn material(area: &[u8], h: &LuksHeader) -> Vec<Vec<u8>> {
        h.slots
            .iter()
            .map(|s| match s.active {
                true => {
                    let at = s.key_offset as usize * SECTOR;
                    area[at..at + h.material_len(s) as usize].to_vec()
                }
                false => Vec::new(),
            })
            .collect()
    }

    #[test]
    fn build_then_unlock() {
        let p = LuksParams {
            iter_time_ms: 1,
            ..LuksParams::default()
        };
        let (area, master) = build(&p, b"abc").unwrap();
        // QEMU's layout for a 64-byte key: slots 504 sectors apart from sector 8.
        assert_eq!(area.len(), 2068480);
        let h = LuksHeader::parse(&area, area.len() as u64).unwrap();
        assert_eq!(h.slots[1].key_offset, 8 + 504);
        let m = material(&area, &h);
        let u = unlock(&h, &m, b"abc").unwrap();
        assert_eq!(&u.master[..], &master[..]);
        let e = unlock(&h, &m, b"abd").unwrap_err();
        assert!(e.to_string().contains("Invalid password"), "{e}");
    }
}
