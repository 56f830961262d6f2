//! Conformance of `qcow2 create` against `qemu-img create`: for every creation option (and
//! combinations), the image passes `qemu-img check`, `qemu-img info --output=json` reports
//! the settings asked for and the same `format-specific` data as qemu-img's own image of the
//! same options, `qemu-img map` gives the same allocation (preallocation), and QEMU can write
//! and read it. Options qemu-img refuses are refused too. (`tests/cli_create.rs` covers the
//! output line, the size from the backing file and argument errors.)

use crate::common;

use std::path::Path;
use std::process::Command;

use serde_json::Value;

/// Run `cmd args` in `dir`: (exit code, stdout, stderr).
fn run_in(dir: &Path, cmd: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(cmd)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn info(dir: &Path, img: &str) -> Value {
    let (code, out, err) = run_in(dir, "qemu-img", &["info", "--output=json", img]);
    assert_eq!(code, 0, "qemu-img info {img}: {err}");
    serde_json::from_str(&out).unwrap()
}

/// `qemu-img map --output=json` without what depends on the host layout: offsets, and the
/// `zero` flag of data extents (with metadata preallocation QEMU reports holes of the host
/// file, so it depends on where the L2 tables sit between the data clusters). Adjacent
/// extents that become equal are merged.
fn map_flags(dir: &Path, img: &str) -> Vec<Value> {
    let (code, out, err) = run_in(dir, "qemu-img", &["map", "--output=json", img]);
    assert_eq!(code, 0, "qemu-img map {img}: {err}");
    let v: Vec<Value> = serde_json::from_str(&out).unwrap();
    let mut merged: Vec<Value> = Vec::new();
    for mut e in v {
        let o = e.as_object_mut().unwrap();
        o.remove("offset");
        if o["data"] == true {
            o.insert("zero".into(), false.into());
        }
        let len = o.remove("length").unwrap().as_u64().unwrap();
        if let Some(last) = merged.last_mut() {
            let mut prev = last.clone();
            let prev_obj = prev.as_object_mut().unwrap();
            let prev_len = prev_obj.remove("length").unwrap().as_u64().unwrap();
            let prev_start = prev_obj["start"].as_u64().unwrap();
            prev_obj.insert("start".into(), e["start"].clone());
            if prev == e && prev_start + prev_len == e["start"].as_u64().unwrap() {
                last["length"] = (prev_len + len).into();
                continue;
            }
        }
        e["length"] = len.into();
        merged.push(e);
    }
    merged
}

/// The `format-specific.data` field each option sets, and the JSON value it must show.
fn expected_fields(opts: &str, data_file: &str) -> Vec<(&'static str, Value)> {
    let mut out = Vec::new();
    for kv in opts.split(',').filter(|s| !s.is_empty()) {
        let (k, v) = kv.split_once('=').unwrap();
        let on = |v: &str| Value::Bool(v == "on");
        match k {
            "refcount_bits" => out.push(("refcount-bits", v.parse::<u64>().unwrap().into())),
            "compat" => out.push(("compat", Value::from(if v == "v3" { "1.1" } else { v }))),
            "extended_l2" => out.push(("extended-l2", on(v))),
            "compression_type" => out.push(("compression-type", v.into())),
            "lazy_refcounts" => out.push(("lazy-refcounts", on(v))),
            "data_file" => out.push(("data-file", data_file.into())),
            "data_file_raw" => out.push(("data-file-raw", on(v))),
            _ => {}
        }
    }
    out
}

/// Create with qemu-img and with us (same options, data files of their own); compare.
fn same_as_qemu(dir: &Path, i: usize, opts: &str, size: &str, backing: &[&str]) -> Vec<String> {
    let tag = format!("[{i}] -o {opts:?} {backing:?} {size}");
    let ours = format!("ours{i}.qcow2");
    let theirs = format!("theirs{i}.qcow2");
    let with_data = |who: &str| opts.replace("DATA", &format!("{}/{who}{i}.data", dir.display()));
    let (our_opts, their_opts) = (with_data("ours"), with_data("theirs"));
    let args = |o: &str, img: &str| {
        let mut a = vec![
            "create".to_string(),
            "-q".into(),
            "-f".into(),
            "qcow2".into(),
        ];
        if !o.is_empty() {
            a.extend(["-o".into(), o.to_string()]);
        }
        a.extend(backing.iter().map(|s| s.to_string()));
        a.push(img.to_string());
        if !size.is_empty() {
            a.push(size.to_string());
        }
        a
    };
    let their_args = args(&their_opts, &theirs);
    let our_args = args(&our_opts, &ours);
    let their_args: Vec<&str> = their_args.iter().map(String::as_str).collect();
    let our_args: Vec<&str> = our_args.iter().map(String::as_str).collect();
    let (tcode, _, terr) = run_in(dir, "qemu-img", &their_args);
    let (ocode, oout, oerr) = run_in(dir, env!("CARGO_BIN_EXE_qcow2"), &our_args);
    if tcode != 0 {
        if ocode == 0 {
            return vec![format!(
                "{tag}: qemu-img refuses ({}) but we accept",
                terr.trim()
            )];
        }
        return vec![];
    }
    if ocode != 0 {
        return vec![format!("{tag}: qcow2 create failed: {oout}{oerr}")];
    }
    let mut errors = Vec::new();
    let (code, text, _) = run_in(dir, "qemu-img", &["check", &ours]);
    if code != 0 {
        errors.push(format!("{tag}: qemu-img check exit {code}: {text}"));
    }
    let (a, b) = (info(dir, &ours), info(dir, &theirs));
    for k in [
        "virtual-size",
        "cluster-size",
        "backing-filename",
        "backing-filename-format",
    ] {
        if a[k] != b[k] {
            errors.push(format!("{tag}: info {k}: ours {}, qemu-img {}", a[k], b[k]));
        }
    }
    let (mut fa, mut fb) = (a["format-specific"].clone(), b["format-specific"].clone());
    let our_data_file = format!("{}/ours{i}.data", dir.display());
    for (field, want) in expected_fields(opts, &our_data_file) {
        if fa["data"][field] != want {
            errors.push(format!(
                "{tag}: info format-specific.data.{field} is {}, asked for {want}",
                fa["data"][field]
            ));
        }
    }
    if let Some(cs) = opts
        .split(',')
        .find_map(|kv| kv.strip_prefix("cluster_size="))
        && a["cluster-size"] != b["cluster-size"]
    {
        errors.push(format!(
            "{tag}: cluster size {} (asked {cs})",
            a["cluster-size"]
        ));
    }
    fa["data"].as_object_mut().unwrap().remove("data-file");
    fb["data"].as_object_mut().unwrap().remove("data-file");
    if fa != fb {
        errors.push(format!(
            "{tag}: format-specific differs:\n  ours:     {fa}\n  qemu-img: {fb}"
        ));
    }
    let (ma, mb) = (map_flags(dir, &ours), map_flags(dir, &theirs));
    if ma != mb {
        let i = ma
            .iter()
            .zip(&mb)
            .position(|(x, y)| x != y)
            .unwrap_or(ma.len().min(mb.len()));
        errors.push(format!(
            "{tag}: allocation (qemu-img map, layout-independent) differs at extent {i}:\n  ours:     {}\n  qemu-img: {}",
            ma.get(i).map_or("<none>".into(), |v| v.to_string()),
            mb.get(i).map_or("<none>".into(), |v| v.to_string()),
        ));
    }
    // QEMU writes and reads it, and it stays clean.
    let vsize = a["virtual-size"].as_u64().unwrap();
    if vsize >= 2 << 20 {
        let (code, out, err) = run_in(
            dir,
            "qemu-io",
            &[
                "-c",
                "write -P 0x3c 1000 200000",
                "-c",
                "write -z 1048576 65536",
                "-c",
                "read -P 0x3c 1000 200000",
                "-c",
                "read -P 0 1048576 65536",
                &ours,
            ],
        );
        if code != 0 || out.contains("fail") {
            errors.push(format!("{tag}: qemu-io on our image: {out}{err}"));
        }
        let (code, text, _) = run_in(dir, "qemu-img", &["check", &ours]);
        if code != 0 {
            errors.push(format!(
                "{tag}: qemu-img check after writes exit {code}: {text}"
            ));
        }
    }
    errors
}

fn report(errors: Vec<String>) {
    assert!(
        errors.is_empty(),
        "{} failure(s):\n- {}",
        errors.len(),
        errors.join("\n- ")
    );
}

#[test]
fn every_create_option() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut table: Vec<String> = vec![
        "".into(),
        "compat=0.10".into(),
        "compat=1.1".into(),
        "compat=v3".into(),
        "extended_l2=on".into(),
        "extended_l2=on,cluster_size=32k".into(),
        "extended_l2=on,cluster_size=2M".into(),
        "extended_l2=on,cluster_size=4k".into(),
        "extended_l2=off".into(),
        "compression_type=zlib".into(),
        "compression_type=zstd".into(),
        "compression_type=zstd,compat=0.10".into(),
        "lazy_refcounts=on".into(),
        "lazy_refcounts=off".into(),
        "lazy_refcounts=on,compat=0.10".into(),
        "data_file=DATA".into(),
        "data_file=DATA,data_file_raw=on".into(),
        "data_file=DATA,data_file_raw=off".into(),
        "data_file_raw=on".into(),
        "data_file=DATA,compat=0.10".into(),
        "data_file=DATA,data_file_raw=on,preallocation=metadata".into(),
        "data_file=DATA,data_file_raw=on,preallocation=falloc".into(),
        "data_file=DATA,data_file_raw=on,preallocation=full".into(),
        "data_file=DATA,preallocation=full".into(),
        "data_file=DATA,data_file_raw=on,extended_l2=on,cluster_size=128k".into(),
        "preallocation=off".into(),
        "preallocation=metadata".into(),
        "preallocation=falloc".into(),
        "preallocation=full".into(),
        "preallocation=metadata,cluster_size=512".into(),
        "preallocation=falloc,cluster_size=4k,refcount_bits=1".into(),
        "preallocation=full,cluster_size=2M,extended_l2=on".into(),
        "preallocation=metadata,compat=0.10".into(),
        "cluster_size=2M,refcount_bits=64,lazy_refcounts=on,compression_type=zstd".into(),
    ];
    for c in [
        "512", "1k", "4k", "64k", "128k", "1M", "2M", "3k", "256", "4M",
    ] {
        table.push(format!("cluster_size={c}"));
    }
    for bits in [1, 2, 3, 4, 8, 16, 32, 64, 128] {
        table.push(format!("refcount_bits={bits}"));
        table.push(format!("refcount_bits={bits},cluster_size=512"));
    }
    let mut errors = Vec::new();
    for (i, opts) in table.iter().enumerate() {
        errors.extend(same_as_qemu(d, i, opts, "3M", &[]));
    }
    // Odd and empty sizes.
    let n = table.len();
    errors.extend(same_as_qemu(d, n, "cluster_size=4k", "5243904", &[]));
    errors.extend(same_as_qemu(d, n + 1, "", "0", &[]));
    errors.extend(same_as_qemu(d, n + 2, "preallocation=full", "1000448", &[]));
    errors.extend(same_as_qemu(d, n + 3, "", "1T", &[]));
    errors.extend(same_as_qemu(d, n + 4, "cluster_size=512", "4G", &[]));
    report(errors);
}

/// `-b` with `-F` (relative names, qcow2 and raw backing files, with other options).
#[test]
fn backing_files() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir(d.join("sub")).unwrap();
    common::qemu_create(d.join("base.qcow2"), "", "4M");
    common::qemu_create_fmt(d.join("base.raw"), "raw", "", "3M");
    let mut errors = Vec::new();
    for (i, (opts, backing, size)) in [
        ("", &["-b", "base.qcow2", "-F", "qcow2"][..], "4M"),
        ("", &["-b", "base.qcow2", "-F", "qcow2"][..], ""),
        ("", &["-b", "base.raw", "-F", "raw"][..], ""),
        (
            "compat=0.10",
            &["-b", "base.qcow2", "-F", "qcow2"][..],
            "6M",
        ),
        (
            "extended_l2=on,cluster_size=4k",
            &["-b", "base.raw", "-F", "raw"][..],
            "5M",
        ),
        (
            "cluster_size=2M,refcount_bits=1",
            &["-b", "base.qcow2", "-F", "qcow2"][..],
            "",
        ),
        ("backing_file=base.qcow2,backing_fmt=qcow2", &[][..], ""),
        (
            "preallocation=metadata",
            &["-b", "base.qcow2", "-F", "qcow2"][..],
            "",
        ),
    ]
    .into_iter()
    .enumerate()
    {
        errors.extend(same_as_qemu(d, 100 + i, opts, size, backing));
    }
    // A relative name in a subdirectory resolves against the new image's directory.
    std::fs::copy(d.join("base.qcow2"), d.join("sub/inner.qcow2")).unwrap();
    let (code, out, err) = run_in(
        d,
        env!("CARGO_BIN_EXE_qcow2"),
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "inner.qcow2",
            "-F",
            "qcow2",
            "sub/top.qcow2",
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    let i = info(d, "sub/top.qcow2");
    assert_eq!(i["backing-filename"], "inner.qcow2");
    assert_eq!(i["virtual-size"], 4 << 20);
    common::assert_check_clean(&d.join("sub/top.qcow2"));
    report(errors);
}
