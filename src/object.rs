//! QEMU's `--object TYPE,id=ID,key=value,...` arguments: parsed once here, used by every
//! command that takes them (`serve --object tls-creds-x509,...`, `--object secret,...`).
//!
//! The syntax is QEMU's `QemuOpts`: comma-separated `key=value` pairs, the first bare word
//! being the type (or `qom-type=TYPE`), and a doubled comma standing for a literal comma
//! inside a value (`dir=/a,,b` is the directory `/a,b`).

use std::collections::BTreeMap;

use anyhow::{Result, bail};

/// One `--object` argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Object {
    /// The object type (`tls-creds-x509`, `secret`, ...).
    pub kind: String,
    /// Its `id`, by which other options name it.
    pub id: String,
    /// Every other property.
    pub props: BTreeMap<String, String>,
}

impl Object {
    /// Parse one `--object` value.
    pub fn parse(arg: &str) -> Result<Object> {
        let mut kind = None;
        let mut props = BTreeMap::new();
        for (i, part) in split_commas(arg).into_iter().enumerate() {
            match part.split_once('=') {
                Some(("qom-type", v)) => kind = Some(v.to_string()),
                Some((k, v)) => {
                    if props.insert(k.to_string(), v.to_string()).is_some() {
                        bail!("--object '{arg}': property '{k}' given twice");
                    }
                }
                None if i == 0 => kind = Some(part),
                None => bail!("--object '{arg}': '{part}' is not key=value"),
            }
        }
        let Some(kind) = kind.filter(|k| !k.is_empty()) else {
            bail!("--object '{arg}': the object type is missing");
        };
        let Some(id) = props.remove("id") else {
            bail!("--object '{arg}': parameter 'id' is missing");
        };
        Ok(Object { kind, id, props })
    }

    /// The property `key`, if given.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.props.get(key).map(String::as_str)
    }

    /// A boolean property as QEMU spells them (`on/off`, `yes/no`, `true/false`).
    pub fn flag(&self, key: &str, default: bool) -> Result<bool> {
        match self.get(key) {
            None => Ok(default),
            Some("on" | "yes" | "true") => Ok(true),
            Some("off" | "no" | "false") => Ok(false),
            Some(v) => bail!("object '{}': {key}={v} is not on or off", self.id),
        }
    }

    /// Fail on properties other than `known` (a typo must not silently weaken security).
    pub fn only(&self, known: &[&str]) -> Result<()> {
        match self.props.keys().find(|k| !known.contains(&k.as_str())) {
            Some(k) => bail!(
                "object '{}' ({}): unknown property '{k}'",
                self.id,
                self.kind
            ),
            None => Ok(()),
        }
    }
}

/// Every `--object` of a command line, looked up by id.
#[derive(Debug, Clone, Default)]
pub struct Objects(Vec<Object>);

impl Objects {
    /// Parse every `--object` value; ids must be unique.
    pub fn parse(args: &[String]) -> Result<Objects> {
        let mut list: Vec<Object> = Vec::new();
        for a in args {
            let o = Object::parse(a)?;
            if list.iter().any(|p| p.id == o.id) {
                bail!("attempt to add duplicate object id '{}'", o.id);
            }
            list.push(o);
        }
        Ok(Objects(list))
    }

    /// The object with this id, which must be of type `kind`.
    pub fn get(&self, id: &str, kind: &str) -> Result<&Object> {
        match self.0.iter().find(|o| o.id == id) {
            Some(o) if o.kind == kind => Ok(o),
            Some(o) => bail!("object '{id}' is a {}, not a {kind}", o.kind),
            None => bail!("no object with id '{id}' (add --object {kind},id={id},...)"),
        }
    }
}

/// Split at single commas; `,,` is a literal comma.
fn split_commas(s: &str) -> Vec<String> {
    let mut parts = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            ',' if chars.peek() == Some(&',') => {
                chars.next();
                cur.push(',');
            }
            ',' => parts.push(std::mem::take(&mut cur)),
            c => cur.push(c),
        }
    }
    parts.push(cur);
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_syntax() {
        let o = Object::parse("tls-creds-x509,id=tls0,dir=/a,,b,endpoint=server").unwrap();
        assert_eq!((o.kind.as_str(), o.id.as_str()), ("tls-creds-x509", "tls0"));
        assert_eq!(o.get("dir"), Some("/a,b"));
        assert_eq!(o.get("endpoint"), Some("server"));
        let o = Object::parse("qom-type=secret,id=s,data=x").unwrap();
        assert_eq!(o.kind, "secret");
        assert!(Object::parse("secret,data=x").is_err());
        assert!(Object::parse("id=x").is_err());
        assert!(Object::parse("secret,id=a,id=b").is_err());
        let objs = Objects::parse(&["secret,id=a".into(), "secret,id=a".into()]);
        assert!(objs.is_err());
    }
}
