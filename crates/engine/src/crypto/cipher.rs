//! The bulk cipher: AES-128/192/256 in XTS or CBC mode, with the IV of each 512-byte sector
//! from an IV generator (`plain`: the sector number as little-endian u32, `plain64`: as u64,
//! `essiv`: the plain64 block encrypted with a key that is the hash of the data key). QEMU
//! and LUKS1 name a cipher `aes` + `xts-plain64` / `cbc-essiv:sha256` and so on.
//!
//! The ciphers themselves are RustCrypto's (`aes`, `xts-mode`, `cbc`); this module only
//! picks them and splits buffers into sectors.

use aes::{Aes128, Aes192, Aes256};
use cbc::cipher::block_padding::NoPadding;
use cbc::cipher::{
    BlockDecryptMut, BlockEncrypt, BlockEncryptMut, InnerIvInit, KeyInit,
    generic_array::GenericArray,
};
use xts_mode::Xts128;
use zeroize::Zeroizing;

use super::hash::HashAlg;
use crate::error::{Error, Result};

/// The sector size encryption works in (IVs count these sectors).
pub const SECTOR: usize = 512;

/// An AES key size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CipherAlg {
    /// `aes-128`.
    Aes128,
    /// `aes-192`.
    Aes192,
    /// `aes-256` (QEMU's default).
    Aes256,
}

/// A block cipher mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CipherMode {
    /// `xts` (QEMU's default): the key holds two AES keys.
    Xts,
    /// `cbc`, chained within each sector.
    Cbc,
}

/// How each sector's IV is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IvGen {
    /// `plain`: the sector number truncated to 32 bits.
    Plain,
    /// `plain64` (QEMU's default): the sector number.
    Plain64,
    /// `essiv:HASH`: the sector number encrypted with the hash of the key.
    Essiv(HashAlg),
}

/// A full cipher description: what LUKS1's `cipher-name` + `cipher-mode` strings say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CipherSpec {
    /// The AES key size.
    pub alg: CipherAlg,
    /// The mode.
    pub mode: CipherMode,
    /// The IV generator.
    pub ivgen: IvGen,
}

impl CipherAlg {
    /// Parse QEMU's `cipher-alg` (`aes-128`, `aes-192`, `aes-256`).
    pub fn parse(s: &str) -> Result<CipherAlg> {
        match s {
            "aes-128" => Ok(CipherAlg::Aes128),
            "aes-192" => Ok(CipherAlg::Aes192),
            "aes-256" => Ok(CipherAlg::Aes256),
            _ => Err(Error::unsupported(format!(
                "cipher algorithm '{s}' (only aes-128/192/256)"
            ))),
        }
    }

    /// AES key length in bytes.
    pub fn key_len(self) -> usize {
        match self {
            CipherAlg::Aes128 => 16,
            CipherAlg::Aes192 => 24,
            CipherAlg::Aes256 => 32,
        }
    }

    /// The AES size with this key length.
    fn from_key_len(n: usize) -> Option<CipherAlg> {
        match n {
            16 => Some(CipherAlg::Aes128),
            24 => Some(CipherAlg::Aes192),
            32 => Some(CipherAlg::Aes256),
            _ => None,
        }
    }

    /// QEMU's name.
    pub fn name(self) -> &'static str {
        match self {
            CipherAlg::Aes128 => "aes-128",
            CipherAlg::Aes192 => "aes-192",
            CipherAlg::Aes256 => "aes-256",
        }
    }
}

impl CipherMode {
    /// Parse QEMU's `cipher-mode`.
    pub fn parse(s: &str) -> Result<CipherMode> {
        match s {
            "xts" => Ok(CipherMode::Xts),
            "cbc" => Ok(CipherMode::Cbc),
            _ => Err(Error::unsupported(format!(
                "cipher mode '{s}' (only xts and cbc)"
            ))),
        }
    }

    /// The mode's name.
    pub fn name(self) -> &'static str {
        match self {
            CipherMode::Xts => "xts",
            CipherMode::Cbc => "cbc",
        }
    }
}

impl IvGen {
    /// Parse QEMU's `ivgen-alg` with its `ivgen-hash-alg` (used by essiv only).
    pub fn parse(alg: &str, hash: Option<HashAlg>) -> Result<IvGen> {
        match alg {
            "plain" => Ok(IvGen::Plain),
            "plain64" => Ok(IvGen::Plain64),
            "essiv" => Ok(IvGen::Essiv(hash.unwrap_or(HashAlg::Sha256))),
            _ => Err(Error::unsupported(format!("IV generator '{alg}'"))),
        }
    }
}

impl CipherSpec {
    /// Master key length in bytes (XTS: two AES keys).
    pub fn key_len(&self) -> usize {
        match self.mode {
            CipherMode::Xts => 2 * self.alg.key_len(),
            CipherMode::Cbc => self.alg.key_len(),
        }
    }

    /// Decode LUKS1's `cipher-name` and `cipher-mode` fields and the key length.
    pub fn from_luks(name: &str, mode: &str, key_bytes: usize) -> Result<CipherSpec> {
        if name != "aes" {
            return Err(Error::unsupported(format!(
                "LUKS cipher '{name}' (only aes)"
            )));
        }
        let (m, iv) = mode
            .split_once('-')
            .ok_or_else(|| Error::unsupported(format!("LUKS cipher mode '{mode}'")))?;
        let mode = CipherMode::parse(m)?;
        let (iv, hash) = match iv.split_once(':') {
            Some((a, h)) => (a, Some(HashAlg::parse(h)?)),
            None => (iv, None),
        };
        let ivgen = IvGen::parse(iv, hash)?;
        let aes_len = match mode {
            CipherMode::Xts if key_bytes % 2 == 0 => key_bytes / 2,
            CipherMode::Xts => 0,
            CipherMode::Cbc => key_bytes,
        };
        let alg = CipherAlg::from_key_len(aes_len)
            .ok_or_else(|| Error::unsupported(format!("LUKS key of {key_bytes} bytes for {m}")))?;
        Ok(CipherSpec { alg, mode, ivgen })
    }

    /// LUKS1's `cipher-mode` string (`xts-plain64`, `cbc-essiv:sha256`).
    pub fn luks_mode(&self) -> String {
        let iv = match self.ivgen {
            IvGen::Plain => "plain".to_string(),
            IvGen::Plain64 => "plain64".to_string(),
            IvGen::Essiv(h) => format!("essiv:{}", h.name()),
        };
        format!("{}-{iv}", self.mode.name())
    }
}

/// One AES instance of any key size.
#[derive(Clone)]
enum Aes {
    A128(Aes128),
    A192(Aes192),
    A256(Aes256),
}

impl Aes {
    fn new(key: &[u8]) -> Result<Aes> {
        let bad = |_| Error::invalid_arg(format!("AES key of {} bytes", key.len()));
        Ok(match key.len() {
            16 => Aes::A128(Aes128::new_from_slice(key).map_err(bad)?),
            24 => Aes::A192(Aes192::new_from_slice(key).map_err(bad)?),
            _ => Aes::A256(Aes256::new_from_slice(key).map_err(bad)?),
        })
    }

    fn encrypt_block(&self, block: &mut [u8; 16]) {
        let b = GenericArray::from_mut_slice(block);
        match self {
            Aes::A128(c) => c.encrypt_block(b),
            Aes::A192(c) => c.encrypt_block(b),
            Aes::A256(c) => c.encrypt_block(b),
        }
    }

    /// CBC over `buf` (a multiple of 16 bytes) with `iv`.
    fn cbc(&self, buf: &mut [u8], iv: &[u8; 16], encrypt: bool) {
        fn run<C>(c: &C, buf: &mut [u8], iv: &[u8; 16], encrypt: bool)
        where
            C: Clone
                + cbc::cipher::BlockCipher
                + cbc::cipher::BlockEncrypt
                + cbc::cipher::BlockDecrypt,
            C: cbc::cipher::BlockSizeUser<BlockSize = cbc::cipher::consts::U16>,
        {
            let iv = GenericArray::from_slice(iv);
            let n = buf.len();
            // Lengths are multiples of the block size (checked by the callers), so
            // NoPadding cannot fail.
            if encrypt {
                let _ = cbc::Encryptor::<C>::inner_iv_init(c.clone(), iv)
                    .encrypt_padded_mut::<NoPadding>(buf, n);
            } else {
                let _ = cbc::Decryptor::<C>::inner_iv_init(c.clone(), iv)
                    .decrypt_padded_mut::<NoPadding>(buf);
            }
        }
        match self {
            Aes::A128(c) => run(c, buf, iv, encrypt),
            Aes::A192(c) => run(c, buf, iv, encrypt),
            Aes::A256(c) => run(c, buf, iv, encrypt),
        }
    }
}

/// An XTS instance of any AES key size.
// Boxed: the key schedules are large and of different sizes.
enum Xts {
    X128(Box<Xts128<Aes128>>),
    X192(Box<Xts128<Aes192>>),
    X256(Box<Xts128<Aes256>>),
}

impl Xts {
    fn new(key: &[u8]) -> Result<Xts> {
        let (k1, k2) = key.split_at(key.len() / 2);
        Ok(match (Aes::new(k1)?, Aes::new(k2)?) {
            (Aes::A128(a), Aes::A128(b)) => Xts::X128(Box::new(Xts128::new(a, b))),
            (Aes::A192(a), Aes::A192(b)) => Xts::X192(Box::new(Xts128::new(a, b))),
            (Aes::A256(a), Aes::A256(b)) => Xts::X256(Box::new(Xts128::new(a, b))),
            _ => return Err(Error::invalid_arg("XTS key halves of different sizes")),
        })
    }

    fn run(&self, buf: &mut [u8], tweak: [u8; 16], encrypt: bool) {
        match (self, encrypt) {
            (Xts::X128(x), true) => x.encrypt_sector(buf, tweak),
            (Xts::X128(x), false) => x.decrypt_sector(buf, tweak),
            (Xts::X192(x), true) => x.encrypt_sector(buf, tweak),
            (Xts::X192(x), false) => x.decrypt_sector(buf, tweak),
            (Xts::X256(x), true) => x.encrypt_sector(buf, tweak),
            (Xts::X256(x), false) => x.decrypt_sector(buf, tweak),
        }
    }
}

/// The keyed data cipher of an open image (or of a key slot's key material).
pub struct SectorCipher {
    mode: ModeImpl,
    /// The ESSIV cipher (keyed with the hash of the data key), for `essiv` only.
    essiv: Option<Aes>,
    ivgen: IvGen,
}

enum ModeImpl {
    Xts(Xts),
    Cbc(Box<Aes>),
}

impl std::fmt::Debug for SectorCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.write_str("SectorCipher { .. }")
    }
}

impl SectorCipher {
    /// Key the cipher `spec` with `key` (`spec.key_len()` bytes).
    pub fn new(spec: &CipherSpec, key: &[u8]) -> Result<SectorCipher> {
        if key.len() != spec.key_len() {
            return Err(Error::invalid_arg("key length does not match the cipher"));
        }
        let mode = match spec.mode {
            CipherMode::Xts => ModeImpl::Xts(Xts::new(key)?),
            CipherMode::Cbc => ModeImpl::Cbc(Box::new(Aes::new(key)?)),
        };
        let essiv = match spec.ivgen {
            IvGen::Essiv(h) => {
                let k = Zeroizing::new(h.digest(&[key]));
                if CipherAlg::from_key_len(k.len()).is_none() {
                    return Err(Error::unsupported(format!(
                        "essiv with {} (no AES key of {} bytes)",
                        h.name(),
                        k.len()
                    )));
                }
                Some(Aes::new(&k)?)
            }
            _ => None,
        };
        Ok(SectorCipher {
            mode,
            essiv,
            ivgen: spec.ivgen,
        })
    }

    // IVs are little-endian sector numbers by definition (dm-crypt's plain/plain64/essiv).
    #[allow(clippy::little_endian_bytes)]
    fn iv(&self, sector: u64) -> [u8; 16] {
        let mut iv = [0u8; 16];
        match self.ivgen {
            // Truncation to 32 bits is what `plain` means.
            #[allow(clippy::cast_possible_truncation)]
            IvGen::Plain => iv[..4].copy_from_slice(&(sector as u32).to_le_bytes()),
            IvGen::Plain64 => iv[..8].copy_from_slice(&sector.to_le_bytes()),
            IvGen::Essiv(_) => {
                iv[..8].copy_from_slice(&sector.to_le_bytes());
                if let Some(e) = &self.essiv {
                    e.encrypt_block(&mut iv);
                }
            }
        }
        iv
    }

    /// Encrypt `buf` in place, its first 512-byte sector being number `sector`. The length
    /// must be a multiple of 16 (a short last sector is allowed, as in key material).
    pub fn encrypt(&self, buf: &mut [u8], sector: u64) {
        self.run(buf, sector, true);
    }

    /// Decrypt `buf` in place (as [`SectorCipher::encrypt`]).
    pub fn decrypt(&self, buf: &mut [u8], sector: u64) {
        self.run(buf, sector, false);
    }

    fn run(&self, buf: &mut [u8], first: u64, encrypt: bool) {
        debug_assert_eq!(buf.len() % 16, 0);
        for (i, s) in buf.chunks_mut(SECTOR).enumerate() {
            let iv = self.iv(first + i as u64);
            match &self.mode {
                ModeImpl::Xts(x) => x.run(s, iv, encrypt),
                ModeImpl::Cbc(c) => c.cbc(s, &iv, encrypt),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(alg: CipherAlg, mode: CipherMode, ivgen: IvGen) -> CipherSpec {
        CipherSpec { alg, mode, ivgen }
    }

    #[test]
    fn round_trips_in_every_mode() {
        let data: Vec<u8> = (0..2048u32).map(|i| (i * 7) as u8).collect();
        for alg in [CipherAlg::Aes128, CipherAlg::Aes192, CipherAlg::Aes256] {
            for mode in [CipherMode::Xts, CipherMode::Cbc] {
                for ivgen in [IvGen::Plain, IvGen::Plain64, IvGen::Essiv(HashAlg::Sha256)] {
                    let s = spec(alg, mode, ivgen);
                    let key = vec![0x5au8; s.key_len()];
                    let c = SectorCipher::new(&s, &key).unwrap();
                    let mut b = data.clone();
                    c.encrypt(&mut b, 9);
                    assert_ne!(b, data);
                    let mut one = data[512..1024].to_vec();
                    c.encrypt(&mut one, 10);
                    assert_eq!(one, b[512..1024], "sector numbering {s:?}");
                    c.decrypt(&mut b, 9);
                    assert_eq!(b, data, "{s:?}");
                }
            }
        }
    }

    /// IEEE 1619 XTS-AES-128 vector 2 (key1 = 11.., key2 = 22.., data unit 0x3333333333).
    #[test]
    fn xts_vector() {
        let s = spec(CipherAlg::Aes128, CipherMode::Xts, IvGen::Plain64);
        let mut key = vec![0x11u8; 16];
        key.extend([0x22u8; 16]);
        let c = SectorCipher::new(&s, &key).unwrap();
        let mut b = [0x44u8; 32];
        c.encrypt(&mut b, 0x33_3333_3333);
        let want = [
            0xc4, 0x54, 0x18, 0x5e, 0x6a, 0x16, 0x93, 0x6e, 0x39, 0x33, 0x40, 0x38, 0xac, 0xef,
            0x83, 0x8b, 0xfb, 0x18, 0x6f, 0xff, 0x74, 0x80, 0xad, 0xc4, 0x28, 0x93, 0x82, 0xec,
            0xd6, 0xd3, 0x94, 0xf0,
        ];
        assert_eq!(b, want);
    }

    #[test]
    fn luks_names() {
        let s = CipherSpec::from_luks("aes", "cbc-essiv:sha256", 32).unwrap();
        assert_eq!(
            s,
            spec(
                CipherAlg::Aes256,
                CipherMode::Cbc,
                IvGen::Essiv(HashAlg::Sha256)
            )
        );
        assert_eq!(s.luks_mode(), "cbc-essiv:sha256");
        let s = CipherSpec::from_luks("aes", "xts-plain64", 64).unwrap();
        assert_eq!(s.alg, CipherAlg::Aes256);
        assert!(CipherSpec::from_luks("twofish", "xts-plain64", 64).is_err());
        assert!(CipherSpec::from_luks("aes", "xts-plain64", 63).is_err());
        assert!(CipherSpec::from_luks("aes", "ecb", 16).is_err());
    }
}
