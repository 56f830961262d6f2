//! Test certificates made at test time with `openssl`: a CA, a server and a client
//! certificate, laid out as QEMU's `tls-creds-x509` directories want them.

use std::path::{Path, PathBuf};
use std::process::Command;

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl (apt-get install openssl)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A P-256 key in `key` and a request for `CN=localhost` in `csr`.
fn key_and_request(dir: &Path, key: &str, csr: &str) {
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            key,
            "-out",
            csr,
            "-subj",
            "/CN=localhost",
        ],
    );
}

/// Make `dir` a credentials directory: `ca-cert.pem` (+ its key), `server-cert.pem`,
/// `server-key.pem`, `client-cert.pem`, `client-key.pem`, every leaf signed by the CA and
/// valid for `localhost` and 127.0.0.1. Returns `dir`.
pub fn make(dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            "ca-key.pem",
            "-out",
            "ca-cert.pem",
            "-days",
            "2",
            "-subj",
            "/CN=test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
    for (who, usage) in [("server", "serverAuth"), ("client", "clientAuth")] {
        let (key, csr, ext) = (
            format!("{who}-key.pem"),
            format!("{who}.csr"),
            format!("{who}.ext"),
        );
        key_and_request(dir, &key, &csr);
        let text = format!(
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=critical,CA:FALSE\n\
             keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage={usage}\n"
        );
        std::fs::write(dir.join(&ext), text).unwrap();
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca-cert.pem",
                "-CAkey",
                "ca-key.pem",
                "-CAcreateserial",
                "-out",
                &format!("{who}-cert.pem"),
                "-days",
                "2",
                "-extfile",
                &ext,
            ],
        );
    }
    dir.to_path_buf()
}
