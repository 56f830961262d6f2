//! The `encrypt` part of qcow2 info: the LUKS1 header's public fields (no key material is
//! touched), decoded from the published LUKS1 on-disk layout:
//!
//! ```text
//!  offset size field
//!  0      6    magic "LUKS\xba\xbe"
//!  6      2    version (1)
//!  8      32   cipher name ("aes")
//!  40     32   cipher mode ("xts-plain64", "cbc-essiv:sha256")
//!  72     32   hash spec ("sha256")
//!  104    4    payload offset, in 512-byte sectors
//!  108    4    master key bytes
//!  164    4    master key digest iterations
//!  168    40   UUID
//!  208    8×48 key slots: active (0x00ac71f3), iterations, salt[32], key offset (sectors), stripes
//! ```

use qcow2_engine::Storage;
use qcow2_engine::format::extensions::{Extension, ImageHeader};
use serde::Serialize;

const MAGIC: &[u8; 6] = b"LUKS\xba\xbe";
const HEADER_LEN: usize = 592;
const SLOT_ACTIVE: u32 = 0x00ac_71f3;

/// `format-specific.data.encrypt` as qemu-img prints it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct EncryptInfo {
    #[serde(skip_serializing_if = "Option::is_none")]
    ivgen_alg: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ivgen_hash_alg: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    detached_header: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    hash_alg: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cipher_alg: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    uuid: Option<String>,
    format: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    cipher_mode: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    slots: Option<Vec<Slot>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    payload_offset: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    master_key_iters: Option<u32>,
}

/// One LUKS key slot.
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
struct Slot {
    active: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    iters: Option<u32>,
    key_offset: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    stripes: Option<u32>,
}

fn be32(b: &[u8], off: usize) -> u32 {
    u32::from_be_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

/// A NUL-terminated string field.
fn cstr(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

/// The encryption info of an image with `crypt_method` 1 (AES) or 2 (LUKS); `None` if none.
pub async fn encrypt_info(file: &dyn Storage, ih: &ImageHeader) -> Option<EncryptInfo> {
    let bare = |format| EncryptInfo {
        ivgen_alg: None,
        ivgen_hash_alg: None,
        detached_header: None,
        hash_alg: None,
        cipher_alg: None,
        uuid: None,
        format,
        cipher_mode: None,
        slots: None,
        payload_offset: None,
        master_key_iters: None,
    };
    match ih.header.crypt_method {
        0 => None,
        1 => Some(bare("aes")),
        _ => Some(luks_info(file, ih).await.unwrap_or_else(|| bare("luks"))),
    }
}

/// Decode the LUKS header the full disk encryption extension points at.
async fn luks_info(file: &dyn Storage, ih: &ImageHeader) -> Option<EncryptInfo> {
    let offset = ih.extensions.iter().find_map(|e| match e {
        Extension::FullDiskEncryption { offset, .. } => Some(*offset),
        _ => None,
    })?;
    let mut b = vec![0u8; HEADER_LEN];
    file.read_at(&mut b, offset).await.ok()?;
    if &b[..6] != MAGIC {
        return None;
    }
    let mode = cstr(&b[40..72]);
    let (cipher_mode, ivgen) = mode.split_once('-').unwrap_or((&mode, ""));
    let (ivgen_alg, ivgen_hash) = match ivgen.split_once(':') {
        Some((a, h)) => (a.to_string(), Some(h.to_string())),
        None => (ivgen.to_string(), None),
    };
    let key_bytes = be32(&b, 108);
    let key_bits = if cipher_mode == "xts" {
        key_bytes * 4
    } else {
        key_bytes * 8
    };
    Some(EncryptInfo {
        ivgen_alg: Some(ivgen_alg),
        ivgen_hash_alg: ivgen_hash,
        detached_header: Some(false),
        hash_alg: Some(cstr(&b[72..104])),
        cipher_alg: Some(format!("{}-{key_bits}", cstr(&b[8..40]))),
        uuid: Some(cstr(&b[168..208])),
        format: "luks",
        cipher_mode: Some(cipher_mode.to_string()),
        slots: Some(
            (0..8)
                .map(|i| slot(&b[208 + i * 48..256 + i * 48]))
                .collect(),
        ),
        payload_offset: Some(u64::from(be32(&b, 104)) * 512),
        master_key_iters: Some(be32(&b, 164)),
    })
}

fn slot(s: &[u8]) -> Slot {
    let active = be32(s, 0) == SLOT_ACTIVE;
    Slot {
        active,
        iters: active.then(|| be32(s, 4)),
        key_offset: u64::from(be32(s, 40)) * 512,
        stripes: active.then(|| be32(s, 44)),
    }
}
