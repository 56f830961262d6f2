//! `qcow2 amend -o encrypt.*`: LUKS key slot changes with `qemu-img amend`'s option names,
//! messages and order. The work (and its crash safety) is the library's
//! [`qcow2_engine::crypto::amend::amend_key_slots`]; this file gathers the options, resolves
//! the secret ids and opens the image file under the write lock.

use std::path::Path;

use anyhow::{Result, bail};
use qcow2_engine::crypto::amend::{KeySlotChange, amend_key_slots};

use crate::access::Access;

/// QEMU's PBKDF2 time for a new key slot when `encrypt.iter-time` is not given.
const DEFAULT_ITER_TIME_MS: u64 = 2000;

/// The `encrypt.*` amend options as given (secret ids, not secrets).
#[derive(Debug, Default)]
pub struct KeySlotOptions {
    /// `encrypt.state`: `active` (true) or `inactive` (false).
    state: Option<bool>,
    /// `encrypt.new-secret`: the id of the passphrase to add.
    new_secret: Option<String>,
    /// `encrypt.old-secret`: the id of the passphrase whose slots to erase.
    old_secret: Option<String>,
    /// `encrypt.keyslot`.
    keyslot: Option<i64>,
    /// `encrypt.iter-time`, in milliseconds.
    iter_time: Option<u64>,
    /// Whether any `encrypt.*` option was given.
    any: bool,
}

impl KeySlotOptions {
    /// Take `name=value` if it is an `encrypt.*` key slot option; `Ok(false)` if it is not one.
    pub fn set(&mut self, name: &str, value: &str) -> Result<bool> {
        match name {
            "encrypt.state" => {
                self.state = Some(match value {
                    "active" => true,
                    "inactive" => false,
                    _ => bail!("Parameter 'state' does not accept value '{value}'"),
                })
            }
            "encrypt.new-secret" => self.new_secret = Some(value.to_string()),
            "encrypt.old-secret" => self.old_secret = Some(value.to_string()),
            "encrypt.keyslot" => self.keyslot = Some(number(name, value)?),
            "encrypt.iter-time" => self.iter_time = Some(number(name, value)?),
            _ => return Ok(false),
        }
        self.any = true;
        Ok(true)
    }

    /// Whether any `encrypt.*` option was given.
    pub fn given(&self) -> bool {
        self.any
    }

    /// Refusals that need no image (qemu-img gives them before opening it).
    pub fn validate(&self) -> Result<()> {
        if self.any && self.state.is_none() {
            bail!("Parameter 'state' is missing");
        }
        Ok(())
    }

    /// The change to make, secrets resolved; `force` allows erasing the last slot.
    fn change(&self, force: bool) -> Result<KeySlotChange> {
        let keyslot = match self.keyslot {
            None => None,
            Some(i) => match usize::try_from(i) {
                Ok(i) => Some(i),
                Err(_) => bail!("Invalid keyslot {i} specified, must be between 0 and 7"),
            },
        };
        if self.state == Some(true) {
            let Some(id) = &self.new_secret else {
                bail!("'new-secret' is required to activate a keyslot");
            };
            return Ok(KeySlotChange::Activate {
                new_secret: crate::secrets::by_id(id)?,
                keyslot,
                iter_time_ms: self.iter_time.unwrap_or(DEFAULT_ITER_TIME_MS),
            });
        }
        let old_secret = self
            .old_secret
            .as_deref()
            .map(crate::secrets::by_id)
            .transpose()?;
        Ok(KeySlotChange::Deactivate {
            keyslot,
            old_secret,
            force,
        })
    }
}

/// `Parameter 'NAME' expects a number`, as qemu-img words it.
fn number<T: std::str::FromStr>(name: &str, value: &str) -> Result<T> {
    value
        .parse()
        .map_err(|_| anyhow::anyhow!("Parameter '{name}' expects a number"))
}

/// Apply the key slot change to the image at `path` (opened under the write lock, unlocked
/// with the secret its `--image-opts` named).
pub async fn apply(path: &Path, access: &Access, opts: &KeySlotOptions, force: bool) -> Result<()> {
    let Some(secret) = crate::secrets::for_path(path)? else {
        bail!("Parameter 'encrypt.key-secret' is required for cipher");
    };
    let change = opts.change(force)?;
    let file = crate::disk::open_file(path, true, access.image_lock(true))?;
    let ih = qcow2_engine::image::read_cluster0(&file).await?;
    amend_key_slots(&file, &ih, &secret, &change)
        .await
        .map_err(super::ops_common::plain)?;
    Ok(())
}
