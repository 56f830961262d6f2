//! Changing the key slots of a LUKS image, as `qemu-img amend -o encrypt.*` does:
//! `state=active` adds `new-secret` in a free slot (or `keyslot`), `state=inactive` erases
//! `keyslot` or every slot `old-secret` opens. The image's current secret unlocks the master
//! key first; the last active slot is never erased.
//!
//! Crash order: a new slot's key material is written and flushed before the header marks it
//! active; an erased slot is marked inactive (and flushed) before its material is wiped.

use zeroize::Zeroizing;

use super::Secret;
use super::luks::{self, Unlocked};
use super::luks_header::{HEADER_LEN, SLOTS};
use super::open::{luks_area, unlock_luks};
use crate::error::{Error, Result};
use crate::format::extensions::ImageHeader;
use crate::storage::Storage;

/// One key slot change.
#[derive(Debug, Clone)]
pub enum KeySlotChange {
    /// `encrypt.state=active`: add `new_secret` in slot `keyslot` (the first free one when
    /// `None`), deriving its key for about `iter_time_ms` (QEMU's default 2000).
    Activate {
        /// The passphrase to add.
        new_secret: Secret,
        /// The slot to use; it must be inactive.
        keyslot: Option<usize>,
        /// PBKDF2 time for the new slot, in milliseconds.
        iter_time_ms: u64,
    },
    /// `encrypt.state=inactive`: erase slot `keyslot`, or every slot `old_secret` opens.
    Deactivate {
        /// The slot to erase.
        keyslot: Option<usize>,
        /// Erase the slots this passphrase opens (with `keyslot`: it must open that slot).
        old_secret: Option<Secret>,
        /// Erase even the last active slot (`--force`): the data becomes unreadable.
        force: bool,
    },
}

/// Apply `change` to the LUKS image on `file` (header `ih`), unlocking it with `secret`.
/// The image must not be open elsewhere (the caller holds its write lock).
pub async fn amend_key_slots(
    file: &dyn Storage,
    ih: &ImageHeader,
    secret: &Secret,
    change: &KeySlotChange,
) -> Result<()> {
    let mut u = unlock_luks(file, ih, secret).await?;
    let (offset, _) = luks_area(ih)?;
    match change {
        KeySlotChange::Activate {
            new_secret,
            keyslot,
            iter_time_ms,
        } => activate(file, offset, &mut u, new_secret, *keyslot, *iter_time_ms).await,
        KeySlotChange::Deactivate {
            keyslot,
            old_secret,
            force,
        } => {
            let slots = slots_to_erase(file, ih, &u, *keyslot, old_secret.as_ref()).await?;
            if !force {
                refuse_erasing_all(&u, &slots, *keyslot)?;
            }
            erase(file, offset, &mut u, &slots).await
        }
    }
}

async fn activate(
    file: &dyn Storage,
    offset: u64,
    u: &mut Unlocked,
    new_secret: &Secret,
    keyslot: Option<usize>,
    iter_time_ms: u64,
) -> Result<()> {
    let i = match keyslot {
        Some(i) if i >= SLOTS => return Err(invalid_slot(i)),
        Some(i) if u.header.slots[i].active => {
            return Err(Error::invalid_arg(format!(
                "Refusing to overwrite active keyslot {i} - please erase it first"
            )));
        }
        Some(i) => i,
        None => u
            .header
            .slots
            .iter()
            .position(|s| !s.active)
            .ok_or_else(|| Error::invalid_arg("Can't add a keyslot - all keyslots are in use"))?,
    };
    let (spec, hash) = (u.spec, u.hash);
    let master = u.master.clone();
    let mut header = u.header.clone();
    let secret = new_secret.clone();
    let (header, material) = blocking::unblock(move || {
        let iters = luks::slot_iterations(hash, iter_time_ms);
        let m = luks::seal_slot(
            &mut header,
            i,
            (spec, hash),
            &master,
            secret.expose(),
            iters,
        )?;
        Ok::<_, Error>((header, m))
    })
    .await?;
    let at = offset + u64::from(header.slots[i].key_offset) * 512;
    write(file, &material, at, "writing LUKS key material").await?;
    sync(file).await?;
    u.header = header;
    write_header(file, offset, u).await
}

/// QEMU's refusal of a slot number out of range.
fn invalid_slot(i: usize) -> Error {
    Error::invalid_arg(format!(
        "Invalid keyslot {i} specified, must be between 0 and {}",
        SLOTS - 1
    ))
}

/// The slots to erase: `keyslot` (which `old` must open, if given), or those `old` opens.
/// Messages are qemu-img's.
async fn slots_to_erase(
    file: &dyn Storage,
    ih: &ImageHeader,
    u: &Unlocked,
    keyslot: Option<usize>,
    old: Option<&Secret>,
) -> Result<Vec<usize>> {
    match (keyslot, old) {
        (Some(i), _) if i >= SLOTS => Err(invalid_slot(i)),
        (Some(i), _) if !u.header.slots[i].active => Err(Error::invalid_arg(format!(
            "Given keyslot {i} is already erased (inactive) "
        ))),
        (Some(i), Some(old)) if !matching_slots(file, ih, u, old).await?.contains(&i) => {
            Err(Error::invalid_arg(format!(
                "Given keyslot {i} doesn't contain the given old password for erase operation"
            )))
        }
        (Some(i), _) => Ok(vec![i]),
        (None, Some(old)) => {
            let slots = matching_slots(file, ih, u, old).await?;
            if slots.is_empty() {
                return Err(Error::invalid_arg(
                    "No keyslots match given (old) password for erase operation",
                ));
            }
            Ok(slots)
        }
        (None, None) => Err(Error::invalid_arg(
            "To erase keyslot(s), either explicit keyslot index or the password currently \
             contained in them must be given",
        )),
    }
}

/// Refuse to erase every active slot (the master key, and so the data, would be lost).
fn refuse_erasing_all(u: &Unlocked, slots: &[usize], keyslot: Option<usize>) -> Result<()> {
    let active = u.header.slots.iter().filter(|s| s.active).count();
    if slots.len() < active {
        return Ok(());
    }
    let what = match keyslot {
        Some(i) => format!("Attempt to erase the only active keyslot {i} which"),
        None => "All the active keyslots match the (old) password that was given and erasing \
                 them"
            .to_string(),
    };
    Err(Error::invalid_arg(format!(
        "{what} will erase all the data in the image irreversibly - refusing operation"
    )))
}

/// Active slots that `old` opens (each tried on its own).
async fn matching_slots(
    file: &dyn Storage,
    ih: &ImageHeader,
    u: &Unlocked,
    old: &Secret,
) -> Result<Vec<usize>> {
    let mut out = Vec::new();
    for i in (0..SLOTS).filter(|&i| u.header.slots[i].active) {
        let mut only = u.header.clone();
        for (j, s) in only.slots.iter_mut().enumerate() {
            s.active = j == i;
        }
        if super::open::unlock_with_header(file, ih, only, old)
            .await
            .is_ok()
        {
            out.push(i);
        }
    }
    Ok(out)
}

async fn erase(file: &dyn Storage, offset: u64, u: &mut Unlocked, slots: &[usize]) -> Result<()> {
    for &i in slots {
        let s = &mut u.header.slots[i];
        s.active = false;
        s.iterations = 0;
        s.salt = [0; 32];
    }
    write_header(file, offset, u).await?;
    sync(file).await?;
    for &i in slots {
        let s = &u.header.slots[i];
        // A u64 product: key bytes × stripes in u32 could wrap.
        let len = crate::units::checked_usize(u.header.material_len(s), "LUKS key material")?;
        let mut noise = Zeroizing::new(vec![0u8; len]);
        luks::random(&mut noise)?;
        let at = offset + u64::from(s.key_offset) * 512;
        write(file, &noise, at, "wiping LUKS key material").await?;
    }
    sync(file).await
}

async fn write_header(file: &dyn Storage, offset: u64, u: &Unlocked) -> Result<()> {
    let mut b = vec![0u8; HEADER_LEN];
    u.header.write(&mut b)?;
    write(file, &b, offset, "writing the LUKS header").await
}

async fn write(file: &dyn Storage, b: &[u8], at: u64, what: &str) -> Result<()> {
    file.write_at(b, at)
        .await
        .map_err(|e| Error::io(what.to_string(), e).at(at))
}

async fn sync(file: &dyn Storage) -> Result<()> {
    file.flush()
        .await
        .map_err(|e| Error::io("syncing the LUKS header", e))
}
