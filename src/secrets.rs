//! Secrets the qemu-img way, for encrypted images:
//!
//! - `--object secret,id=ID,data=TEXT` / `file=PATH` (and `format=base64`), any number;
//! - `--image-opts`: the image arguments are option strings such as
//!   `driver=qcow2,file.filename=disk.qcow2,encrypt.key-secret=ID`;
//! - `--key-file PATH` (ours): the passphrase of every encrypted image that names no secret.
//!
//! These are taken out of the command line before clap sees it ([`take_args`]), so every
//! command accepts them; `--object` of other types (TLS credentials for `serve`) stays.
//! A secret is never printed: errors name the object's id only. `data=` puts the secret on
//! the process's command line for other users to see; prefer `file=` or `--key-file`.

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use anyhow::{Context, Result, bail};
use base64::Engine;
use qcow2_engine::crypto::Secret;

/// Everything the command line said about secrets.
#[derive(Default)]
struct Registry {
    /// `--object secret` by id.
    objects: HashMap<String, Secret>,
    /// Image path → secret id, from `--image-opts` and from images we created encrypted.
    paths: HashMap<PathBuf, String>,
    /// `--key-file`: for encrypted images that name no secret.
    default: Option<Secret>,
}

fn registry() -> &'static Mutex<Registry> {
    static R: OnceLock<Mutex<Registry>> = OnceLock::new();
    R.get_or_init(|| Mutex::new(Registry::default()))
}

/// Split a QEMU option string at single commas (`,,` is a literal comma) into `key=value`
/// pairs (a bare word is a key with an empty value).
fn split_opts(s: &str) -> Vec<(String, String)> {
    let mut parts = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                cur.push(',');
                continue;
            }
            parts.push(std::mem::take(&mut cur));
        } else {
            cur.push(c);
        }
    }
    parts.push(cur);
    parts
        .into_iter()
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (p, String::new()),
        })
        .collect()
}

/// Parse `secret,id=...,data=...|file=...[,format=raw|base64]`.
fn parse_secret_object(s: &str) -> Result<(String, Secret)> {
    let (mut id, mut data, mut file, mut base64) = (None, None, None, false);
    for (k, v) in split_opts(s).into_iter().skip(1) {
        match k.as_str() {
            "id" => id = Some(v),
            "data" => data = Some(v.into_bytes()),
            "file" => file = Some(v),
            "format" if v == "base64" => base64 = true,
            "format" if v == "raw" => base64 = false,
            _ => bail!("--object secret: unknown or invalid property '{k}'"),
        }
    }
    let id = id.context("--object secret needs an id")?;
    let bytes = match (data, file) {
        (Some(d), None) => d,
        (None, Some(f)) => {
            std::fs::read(&f).with_context(|| format!("secret '{id}': could not read '{f}'"))?
        }
        _ => bail!("secret '{id}': exactly one of data= and file= is required"),
    };
    let bytes = match base64 {
        true => base64::engine::general_purpose::STANDARD
            .decode(bytes.trim_ascii())
            .map_err(|_| anyhow::anyhow!("secret '{id}': invalid base64"))?,
        false => bytes,
    };
    Ok((id, Secret::new(bytes)))
}

/// An `--image-opts` image string: the file name and the secret id it names.
fn parse_image_opts(s: &str) -> Result<(String, Option<String>)> {
    let (mut file, mut secret) = (None, None);
    for (k, v) in split_opts(s) {
        match k.as_str() {
            "file.filename" | "file" => file = Some(v),
            "encrypt.key-secret" => secret = Some(v),
            "driver" if v == "qcow2" || v == "raw" => {}
            "driver" => bail!("--image-opts: unsupported driver '{v}'"),
            "file.driver" if v == "file" => {}
            _ => bail!("--image-opts: unsupported option '{k}'"),
        }
    }
    Ok((
        file.context("--image-opts: file.filename is required")?,
        secret,
    ))
}

/// Take the secret options out of `args` (the whole command line) and remember them;
/// returns the arguments for clap, image option strings replaced by their file names.
pub fn take_args(args: impl IntoIterator<Item = OsString>) -> Result<Vec<OsString>> {
    let args: Vec<OsString> = args.into_iter().collect();
    let image_opts = args.iter().any(|a| a == "--image-opts");
    let mut out = Vec::with_capacity(args.len());
    let mut reg = registry().lock().unwrap_or_else(|e| e.into_inner());
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        let s = a.to_string_lossy().into_owned();
        let value = |flag: &str, it: &mut std::vec::IntoIter<OsString>| -> Result<Option<String>> {
            if s == flag {
                let v = it.next().with_context(|| format!("{flag} needs a value"))?;
                return Ok(Some(v.to_string_lossy().into_owned()));
            }
            Ok(s.strip_prefix(&format!("{flag}=")).map(str::to_string))
        };
        if s == "--image-opts" {
            continue;
        }
        if let Some(path) = value("--key-file", &mut it)? {
            let b = std::fs::read(&path).with_context(|| format!("could not read '{path}'"))?;
            reg.default = Some(Secret::new(b));
            continue;
        }
        if s == "--object" || s.starts_with("--object=") {
            let v = value("--object", &mut it)?.unwrap_or_default();
            if v == "secret" || v.starts_with("secret,") {
                let (id, secret) = parse_secret_object(&v)?;
                reg.objects.insert(id, secret);
            } else {
                out.push("--object".into());
                out.push(v.into());
            }
            continue;
        }
        if image_opts && s.contains("file.filename=") {
            let (file, secret) = parse_image_opts(&s)?;
            if let Some(id) = secret {
                reg.paths.insert(PathBuf::from(&file), id);
            }
            out.push(file.into());
            continue;
        }
        out.push(a);
    }
    Ok(out)
}

/// The secret object `id`.
pub fn by_id(id: &str) -> Result<Secret> {
    let reg = registry().lock().unwrap_or_else(|e| e.into_inner());
    reg.objects
        .get(id)
        .cloned()
        .with_context(|| format!("No secret with id '{id}'"))
}

/// Remember that the image at `path` opens with secret `id` (a target created encrypted).
pub fn register(path: &Path, id: &str) {
    let mut reg = registry().lock().unwrap_or_else(|e| e.into_inner());
    reg.paths.insert(path.to_path_buf(), id.to_string());
}

/// The secret to open the image at `path` with, if any: the one its image options (or its
/// creation) named, else `--key-file`'s.
pub fn for_path(path: &Path) -> Result<Option<Secret>> {
    let id = {
        let reg = registry().lock().unwrap_or_else(|e| e.into_inner());
        match reg.paths.get(path) {
            Some(id) => id.clone(),
            None => return Ok(reg.default.clone()),
        }
    };
    by_id(&id).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn option_strings() {
        let (id, s) = parse_secret_object("secret,id=sec0,data=a,,b").unwrap();
        assert_eq!((id.as_str(), s.expose()), ("sec0", &b"a,b"[..]));
        let (_, s) = parse_secret_object("secret,id=x,data=YWJj,format=base64").unwrap();
        assert_eq!(s.expose(), b"abc");
        assert!(parse_secret_object("secret,data=abc").is_err());
        let e = parse_secret_object("secret,id=s,data=%%%,format=base64").unwrap_err();
        assert!(!e.to_string().contains("%%%"), "{e}");
        let (f, id) =
            parse_image_opts("driver=qcow2,file.filename=a,,b.qcow2,encrypt.key-secret=s").unwrap();
        assert_eq!((f.as_str(), id.as_deref()), ("a,b.qcow2", Some("s")));
    }
}
