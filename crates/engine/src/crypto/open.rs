//! Unlocking an encrypted image at open: read the LUKS header and the active slots' key
//! material (each bounded), derive the master key off the executor (PBKDF2 is slow on
//! purpose), and key the data cipher. Legacy AES keys come straight from the passphrase.

use std::sync::Arc;

use zeroize::Zeroizing;

use super::Secret;
use super::cipher::{CipherAlg, CipherMode, CipherSpec, IvGen, SectorCipher};
use super::luks_header::{HEADER_LEN, LuksHeader};
use crate::error::{Error, Result};
use crate::format::extensions::{Extension, ImageHeader};
use crate::format::header;
use crate::storage::Storage;

/// The data cipher of an unlocked image.
#[derive(Debug, Clone)]
pub(crate) enum ImageCrypto {
    /// LUKS: IVs from host offsets; data goes through [`super::CryptStorage`].
    Luks(Arc<SectorCipher>),
    /// Legacy AES-128-CBC (plain64): IVs from guest offsets; read only.
    LegacyAes(Arc<SectorCipher>),
}

/// Where the LUKS area is: the full disk encryption extension's offset and length.
pub(crate) fn luks_area(ih: &ImageHeader) -> Result<(u64, u64)> {
    ih.extensions
        .iter()
        .find_map(|e| match e {
            Extension::FullDiskEncryption { offset, length } => Some((*offset, *length)),
            _ => None,
        })
        .ok_or_else(|| Error::invalid("LUKS image without a full disk encryption header extension"))
}

/// Read and parse the LUKS header of the image.
pub(crate) async fn read_luks_header(file: &dyn Storage, ih: &ImageHeader) -> Result<LuksHeader> {
    let (offset, length) = luks_area(ih)?;
    let mut b = vec![0u8; HEADER_LEN];
    file.read_at(&mut b, offset)
        .await
        .map_err(|e| Error::io("reading the LUKS header", e).at(offset))?;
    LuksHeader::parse(&b, length).map_err(|e| e.at(offset))
}

/// Each slot's key material (empty for inactive slots).
async fn read_material(file: &dyn Storage, offset: u64, h: &LuksHeader) -> Result<Vec<Vec<u8>>> {
    let mut out = Vec::with_capacity(h.slots.len());
    for s in &h.slots {
        if !s.active {
            out.push(Vec::new());
            continue;
        }
        // parse() bounded the length to MAX_KEY_MATERIAL.
        let len = usize::try_from(h.material_len(s)).unwrap_or(0);
        let at = offset + u64::from(s.key_offset) * 512;
        let mut m = vec![0u8; len];
        file.read_at(&mut m, at)
            .await
            .map_err(|e| Error::io("reading LUKS key material", e).at(at))?;
        out.push(m);
    }
    Ok(out)
}

/// Unlock the image's LUKS area with `secret`: the header and the master key.
pub(crate) async fn unlock_luks(
    file: &dyn Storage,
    ih: &ImageHeader,
    secret: &Secret,
) -> Result<super::luks::Unlocked> {
    let h = read_luks_header(file, ih).await?;
    unlock_with_header(file, ih, h, secret).await
}

/// Unlock with the key slots of `h` (the image's header, or a copy with some slots off).
pub(crate) async fn unlock_with_header(
    file: &dyn Storage,
    ih: &ImageHeader,
    h: LuksHeader,
    secret: &Secret,
) -> Result<super::luks::Unlocked> {
    let (offset, _) = luks_area(ih)?;
    let material = read_material(file, offset, &h).await?;
    let secret = secret.clone();
    blocking::unblock(move || super::luks::unlock(&h, &material, secret.expose())).await
}

/// The data cipher of an image with `crypt_method` 1 or 2, unlocked with `secret`;
/// `None` for an unencrypted image or when no secret was given (data access is then refused).
pub(crate) async fn open_crypto(
    file: &dyn Storage,
    ih: &ImageHeader,
    secret: Option<&Secret>,
) -> Result<Option<ImageCrypto>> {
    let Some(secret) = secret else {
        return Ok(None);
    };
    match ih.header.crypt_method {
        header::CRYPT_LUKS => {
            let u = unlock_luks(file, ih, secret).await?;
            let c = SectorCipher::new(&u.spec, &u.master)?;
            Ok(Some(ImageCrypto::Luks(Arc::new(c))))
        }
        header::CRYPT_AES => Ok(Some(ImageCrypto::LegacyAes(Arc::new(legacy_cipher(
            secret,
        )?)))),
        _ => Ok(None),
    }
}

/// Legacy qcow AES: AES-128-CBC, plain64 IVs, the key being the passphrase's first 16 bytes
/// zero-padded (QEMU's rule).
pub(crate) fn legacy_cipher(secret: &Secret) -> Result<SectorCipher> {
    let mut key = Zeroizing::new([0u8; 16]);
    let p = secret.expose();
    let n = p.len().min(16);
    key[..n].copy_from_slice(&p[..n]);
    let spec = CipherSpec {
        alg: CipherAlg::Aes128,
        mode: CipherMode::Cbc,
        ivgen: IvGen::Plain64,
    };
    SectorCipher::new(&spec, &key[..])
}
