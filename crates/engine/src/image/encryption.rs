//! The image layer's encryption hooks (issue 14): unlock at open, wrap the data storage for
//! LUKS, decrypt legacy AES in the read path. Without the `luks` feature an encrypted image
//! opens for `info`/`map` only, as before.

use std::sync::Arc;

use super::Image;
use crate::error::{Error, Result};
use crate::format::extensions::ImageHeader;
use crate::storage::Storage;
use crate::units::{GuestOffset, HostOffset};

/// The unlocked data cipher of an encrypted image, if any.
#[cfg(feature = "luks")]
pub(crate) type Crypto = Option<crate::crypto::ImageCrypto>;
/// Without the `luks` feature nothing is ever unlocked.
#[cfg(not(feature = "luks"))]
pub(crate) type Crypto = ();

/// Unlock the image with the caller's secret (if it is encrypted and one was given), and put
/// the LUKS encryption layer over `data`.
#[cfg(feature = "luks")]
pub(crate) async fn setup(
    file: &dyn Storage,
    ih: &ImageHeader,
    data: Arc<dyn Storage>,
    opts: &super::OpenOptions,
) -> Result<(Arc<dyn Storage>, Crypto)> {
    use crate::crypto::{CryptStorage, ImageCrypto};
    if ih.header.crypt_method == 0 {
        return Ok((data, None));
    }
    let crypto = crate::crypto::open_crypto(file, ih, opts.key_secret.as_ref()).await?;
    if opts.writable && !matches!(crypto, Some(ImageCrypto::Luks(_))) {
        return Err(refuse_write(crypto.is_some()));
    }
    let data: Arc<dyn Storage> = match &crypto {
        Some(ImageCrypto::Luks(c)) => Arc::new(CryptStorage::new(data, c.clone())),
        _ => data,
    };
    Ok((data, crypto))
}

/// Without the `luks` feature: encrypted images open read-only, without data access.
#[cfg(not(feature = "luks"))]
pub(crate) async fn setup(
    _file: &dyn Storage,
    ih: &ImageHeader,
    data: Arc<dyn Storage>,
    opts: &super::OpenOptions,
) -> Result<(Arc<dyn Storage>, Crypto)> {
    if ih.header.crypt_method != 0 && opts.writable {
        return Err(refuse_write(false));
    }
    Ok((data, ()))
}

fn refuse_write(legacy: bool) -> Error {
    match legacy {
        true => Error::unsupported("legacy AES-encrypted images can only be opened read-only"),
        false => Error::invalid_arg(
            "the image is encrypted: opening it for writing needs its key secret",
        ),
    }
}

impl Image {
    /// Refuse data access to an encrypted image that was not unlocked.
    pub(super) fn check_data_access(&self) -> Result<()> {
        if self.inner.encrypted && !self.is_unlocked() {
            return Err(Error::invalid_arg(
                "the image is encrypted: data access needs its key secret",
            ));
        }
        Ok(())
    }

    #[cfg(feature = "luks")]
    fn is_unlocked(&self) -> bool {
        self.inner.crypto.is_some()
    }

    #[cfg(not(feature = "luks"))]
    fn is_unlocked(&self) -> bool {
        false
    }

    /// Read `buf.len()` bytes of guest data at host offset `host` (guest offset `guest`),
    /// decrypting legacy AES data (whose IVs come from guest offsets). LUKS data is
    /// decrypted by the data storage itself.
    pub(super) async fn read_data(
        &self,
        buf: &mut [u8],
        host: HostOffset,
        guest: GuestOffset,
    ) -> Result<()> {
        #[cfg(feature = "luks")]
        if let Some(crate::crypto::ImageCrypto::LegacyAes(c)) = &self.inner.crypto {
            return self.read_legacy(c, buf, host, guest).await;
        }
        let _ = guest;
        self.inner
            .data
            .read_at(buf, host.0)
            .await
            .map_err(|e| Error::io("reading guest data", e).at_host(host))
    }

    /// Legacy AES: read whole sectors and decrypt them with guest sector numbers (host and
    /// guest offsets share their place inside a cluster, so sectors line up).
    #[cfg(feature = "luks")]
    async fn read_legacy(
        &self,
        c: &crate::crypto::SectorCipher,
        buf: &mut [u8],
        host: HostOffset,
        guest: GuestOffset,
    ) -> Result<()> {
        let head = guest.0 % 512;
        let len = (head + buf.len() as u64).div_ceil(512) * 512;
        let mut tmp = vec![0u8; crate::units::to_usize(len)];
        self.inner
            .data
            .read_at(&mut tmp, host.0 - head)
            .await
            .map_err(|e| Error::io("reading guest data", e).at_host(host))?;
        c.decrypt(&mut tmp, (guest.0 - head) / 512);
        buf.copy_from_slice(
            &tmp[crate::units::to_usize(head)..crate::units::to_usize(head) + buf.len()],
        );
        Ok(())
    }
}
