//! The `encrypt.*` create options (QEMU's names) and writing the new image's LUKS area.
//!
//! QEMU places the LUKS area in whole clusters right after the L1 table, zero-filled (the
//! inactive key slots' material stays zero), and points the full disk encryption header
//! extension at it; `crypt_method` is 2.

use crate::crypto::{CipherAlg, CipherMode, CipherSpec, HashAlg, IvGen, LuksParams, Secret};
use crate::error::{Error, Result};

/// `-o encrypt.*` options. The secret itself is resolved by the caller (the CLI's
/// `--object secret,id=...`) and put in [`EncryptOptions::secret`].
#[derive(Debug, Clone, Default)]
pub struct EncryptOptions {
    /// `encrypt.format` (`luks`; `aes` is refused: QEMU only reads it today).
    pub format: Option<String>,
    /// `encrypt.key-secret`: the id of the secret object.
    pub key_secret: Option<String>,
    /// The passphrase the id names (filled by the caller).
    pub secret: Option<Secret>,
    /// `encrypt.cipher-alg` (default `aes-256`).
    pub cipher_alg: Option<String>,
    /// `encrypt.cipher-mode` (default `xts`).
    pub cipher_mode: Option<String>,
    /// `encrypt.ivgen-alg` (default `plain64`).
    pub ivgen_alg: Option<String>,
    /// `encrypt.ivgen-hash-alg` (default `sha256`; essiv only).
    pub ivgen_hash_alg: Option<String>,
    /// `encrypt.hash-alg` (default `sha256`).
    pub hash_alg: Option<String>,
    /// `encrypt.iter-time` in milliseconds (default 2000).
    pub iter_time: Option<u64>,
}

impl EncryptOptions {
    /// Apply one option (`format`, `key-secret`, `cipher-alg`, ... without the `encrypt.`
    /// prefix). Returns `false` if the name is not an encryption option.
    pub fn apply(&mut self, key: &str, value: &str) -> Result<bool> {
        let v = Some(value.to_string());
        match key {
            "format" => self.format = v,
            "key-secret" => self.key_secret = v,
            "cipher-alg" => self.cipher_alg = v,
            "cipher-mode" => self.cipher_mode = v,
            "ivgen-alg" => self.ivgen_alg = v,
            "ivgen-hash-alg" => self.ivgen_hash_alg = v,
            "hash-alg" => self.hash_alg = v,
            "iter-time" => {
                let ms = value
                    .parse()
                    .map_err(|_| Error::invalid_arg(format!("invalid iter-time '{value}'")))?;
                self.iter_time = Some(ms);
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// Whether any option asks for encryption.
    pub fn wanted(&self) -> bool {
        self.format.is_some()
    }

    /// The LUKS parameters the options give (QEMU's defaults for the rest).
    pub fn luks_params(&self) -> Result<LuksParams> {
        match self.format.as_deref() {
            Some("luks") => {}
            Some("aes") => {
                return Err(Error::unsupported(
                    "creating legacy AES-encrypted images (use encrypt.format=luks)",
                ));
            }
            Some(f) => return Err(Error::invalid_arg(format!("unknown encrypt.format '{f}'"))),
            None => return Err(Error::invalid_arg("encrypt.format is not set")),
        }
        let d = LuksParams::default();
        let hash = |s: &Option<String>| s.as_deref().map(HashAlg::parse).transpose();
        let spec = CipherSpec {
            alg: match &self.cipher_alg {
                Some(a) => CipherAlg::parse(a)?,
                None => d.spec.alg,
            },
            mode: match &self.cipher_mode {
                Some(m) => CipherMode::parse(m)?,
                None => d.spec.mode,
            },
            ivgen: match &self.ivgen_alg {
                Some(a) => IvGen::parse(a, hash(&self.ivgen_hash_alg)?)?,
                None => d.spec.ivgen,
            },
        };
        crate::crypto::luks::check_creatable(spec.key_len())?;
        Ok(LuksParams {
            spec,
            hash: hash(&self.hash_alg)?.unwrap_or(d.hash),
            iter_time_ms: self.iter_time.unwrap_or(d.iter_time_ms),
        })
    }

    /// The secret, or QEMU's error when there is none.
    pub(crate) fn require_secret(&self) -> Result<&Secret> {
        self.secret.as_ref().ok_or_else(|| {
            Error::invalid_arg("Parameter 'encrypt.key-secret' is required for cipher")
        })
    }
}

/// Build the LUKS area (header and slot 0 keyed with the secret), off the executor: PBKDF2
/// runs for `iter-time`.
pub(crate) async fn luks_area(opts: &EncryptOptions) -> Result<Vec<u8>> {
    let params = opts.luks_params()?;
    let secret = opts.require_secret()?.clone();
    let (area, _master) =
        blocking::unblock(move || crate::crypto::luks::build(&params, secret.expose())).await?;
    Ok(area)
}
