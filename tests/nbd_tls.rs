//! TLS (`NBD_OPT_STARTTLS`): `qcow2 serve --object tls-creds-x509,... --tls-creds` with
//! certificates made at test time, against QEMU's and libnbd's clients; and the option rules
//! before TLS, spoken by hand (qemu-nbd's answers: ERR_TLS_REQD, a hang-up for EXPORT_NAME,
//! ERR_POLICY without TLS configured).

use std::path::Path;

use crate::common::bg::Bg;
use crate::common::{path_in, qemu_create, qemu_io, status};
use crate::nbd_util::proto::*;
use crate::nbd_util::{Raw, TestServer, create_image, pki};
use qcow2_nbd::TlsConfig;

const BIN: &str = env!("CARGO_BIN_EXE_qcow2");

/// `qcow2 serve` with TLS on `sock` (`extra` before the file).
fn serve_tls(pki: &Path, sock: &Path, img: &str, extra: &[&str]) -> Bg {
    let object = format!(
        "tls-creds-x509,id=tls0,dir={},endpoint=server",
        pki.display()
    );
    let mut args = vec![
        "serve",
        "-t",
        "-k",
        sock.to_str().unwrap(),
        "--object",
        &object,
    ];
    args.extend_from_slice(&["--tls-creds", "tls0"]);
    args.extend_from_slice(extra);
    args.push(img);
    Bg::serving(BIN, &args, sock)
}

/// qemu-img's `--image-opts` for the export over TLS with the credentials in `pki`.
fn qemu_tls(pki: &Path, sock: &Path) -> (String, String) {
    let object = format!("tls-creds-x509,id=c0,dir={},endpoint=client", pki.display());
    let opts = format!(
        "driver=nbd,server.type=unix,server.path={},tls-creds=c0,tls-hostname=localhost",
        sock.display()
    );
    (object, opts)
}

fn have_nbdinfo() -> bool {
    std::process::Command::new("nbdinfo")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn qemu_img_convert_over_tls_copies_the_image() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki::make(&dir.path().join("pki"));
    let img = path_in(dir.path(), "a.qcow2");
    qemu_create(&img, "", "8M");
    qemu_io(
        &img,
        &[
            "write -P 0x5a 0 1M",
            "write -P 0xa5 5M 64k",
            "write -z 6M 1M",
        ],
    );
    let sock = dir.path().join("s.sock");
    let srv = serve_tls(&pki, &sock, &img, &[]);
    let out = path_in(dir.path(), "out.qcow2");
    let (object, opts) = qemu_tls(&pki, &sock);
    let (code, text) = status(
        "qemu-img",
        &[
            "convert",
            "-O",
            "qcow2",
            "--object",
            &object,
            "--image-opts",
            &opts,
            &out,
        ],
    );
    assert_eq!(code, 0, "convert over TLS: {text}");
    assert_eq!(srv.stop(), 0);
    let (code, text) = status("qemu-img", &["compare", &img, &out]);
    assert_eq!(code, 0, "the copy differs: {text}");
}

#[test]
fn clients_without_tls_or_the_right_ca_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki::make(&dir.path().join("pki"));
    let other = pki::make(&dir.path().join("other"));
    let img = path_in(dir.path(), "a.qcow2");
    qemu_create(&img, "", "1M");
    let sock = dir.path().join("s.sock");
    let srv = serve_tls(&pki, &sock, &img, &[]);
    let plain = format!("nbd+unix:///?socket={}", sock.display());
    let (code, text) = status("qemu-img", &["info", &plain]);
    assert_ne!(code, 0);
    assert!(text.contains("TLS negotiation required"), "{text}");
    // Another CA: the client does not trust our certificate, nor we its certificate.
    let (object, opts) = qemu_tls(&other, &sock);
    let (code, text) = status(
        "qemu-img",
        &["info", "--object", &object, "--image-opts", &opts],
    );
    assert_ne!(code, 0, "a client of another CA got in: {text}");
    let (object, opts) = qemu_tls(&pki, &sock);
    let (code, text) = status(
        "qemu-img",
        &["info", "--object", &object, "--image-opts", &opts],
    );
    assert_eq!(code, 0, "{text}");
    if have_nbdinfo() {
        let uri = |p: &Path| {
            format!(
                "nbds+unix:///?socket={}&tls-certificates={}",
                sock.display(),
                p.display()
            )
        };
        let (code, text) = status("nbdinfo", &["--json", &uri(&pki)]);
        assert_eq!(code, 0, "{text}");
        assert!(text.contains("\"TLS\": true"), "{text}");
        let (code, _) = status("nbdinfo", &["--json", &uri(&other)]);
        assert_ne!(code, 0);
    }
    assert_eq!(srv.stop(), 0);
}

#[test]
fn verify_peer_off_lets_clients_without_a_certificate_in() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki::make(&dir.path().join("pki"));
    // A client directory with the CA only: no client certificate to show.
    let ca_only = dir.path().join("ca-only");
    std::fs::create_dir(&ca_only).unwrap();
    std::fs::copy(pki.join("ca-cert.pem"), ca_only.join("ca-cert.pem")).unwrap();
    let img = path_in(dir.path(), "a.qcow2");
    qemu_create(&img, "", "1M");
    let sock = dir.path().join("s.sock");
    let object = format!(
        "tls-creds-x509,id=tls0,dir={},endpoint=server,verify-peer=off",
        pki.display()
    );
    let s = sock.to_str().unwrap();
    let srv = Bg::serving(
        BIN,
        &[
            "serve",
            "-t",
            "-k",
            s,
            "--object",
            &object,
            "--tls-creds",
            "tls0",
            &img,
        ],
        &sock,
    );
    let (object, opts) = qemu_tls(&ca_only, &sock);
    let (code, text) = status(
        "qemu-img",
        &["info", "--object", &object, "--image-opts", &opts],
    );
    assert_eq!(code, 0, "{text}");
    assert_eq!(srv.stop(), 0);
    // With verify-peer (the default) the same client is refused.
    let srv = serve_tls(&pki, &sock, &img, &[]);
    let (code, _) = status(
        "qemu-img",
        &["info", "--object", &object, "--image-opts", &opts],
    );
    assert_ne!(code, 0);
    assert_eq!(srv.stop(), 0);
}

#[test]
fn bad_tls_arguments_are_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let img = path_in(dir.path(), "a.qcow2");
    qemu_create(&img, "", "1M");
    let sock = dir.path().join("s.sock");
    let s = sock.to_str().unwrap();
    let empty = dir.path().display().to_string();
    for (args, expect) in [
        (vec!["--tls-creds", "nope"], "no object with id 'nope'"),
        (
            vec!["--tls-hostname", "h"],
            "--tls-hostname is not permitted without --tls-creds",
        ),
        (
            vec![
                "--object",
                "tls-creds-x509,id=t,endpoint=client",
                "--tls-creds",
                "t",
            ],
            "server endpoint",
        ),
        (
            vec![
                "--object",
                &format!("tls-creds-x509,id=t,dir={empty},endpoint=server"),
                "--tls-creds",
                "t",
            ],
            "ca-cert.pem",
        ),
        (vec!["--object", "tls-creds-x509,dir=x"], "'id' is missing"),
    ] {
        let mut full = vec!["serve", "-k", s];
        full.extend_from_slice(&args);
        full.push(&img);
        let r = crate::common::qcow2(&full);
        assert_eq!(r.code, 1, "{args:?}: {}", r.stderr);
        assert!(r.stderr.contains(expect), "{args:?}: {}", r.stderr);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn before_tls_only_starttls_and_abort_are_answered() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki::make(&dir.path().join("pki"));
    let img = dir.path().join("a.qcow2");
    create_image(&img, 1 << 20).await;
    let tls = TlsConfig::from_x509_dir(&pki, true).unwrap();
    let srv = TestServer::start_configured(dir.path(), &[("", &img, true)], |s| s.tls(tls)).await;
    let mut c = Raw::connect_with(&srv.socket, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).await;
    for opt in [
        OPT_LIST,
        OPT_STRUCTURED_REPLY,
        OPT_INFO,
        OPT_GO,
        OPT_LIST_META_CONTEXT,
        99,
    ] {
        c.option(opt, &[]).await;
        let (o, kind, _) = c.opt_reply().await;
        assert_eq!((o, kind), (opt, REP_ERR_TLS_REQD));
    }
    c.option(OPT_STARTTLS, b"data").await;
    assert_eq!(c.opt_reply().await.1, REP_ERR_INVALID);
    c.option(OPT_ABORT, &[]).await;
    assert_eq!(c.opt_reply().await.1, REP_ACK);
    assert!(c.closed().await);
    // EXPORT_NAME cannot be refused: the server hangs up.
    let mut c = Raw::connect_with(&srv.socket, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).await;
    c.option(OPT_EXPORT_NAME, b"").await;
    assert!(c.closed().await);
    // STARTTLS is acknowledged (the TLS handshake would follow).
    let mut c = Raw::connect_with(&srv.socket, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).await;
    c.option(OPT_STARTTLS, &[]).await;
    assert_eq!(c.opt_reply().await.1, REP_ACK);
    drop(c);
    srv.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starttls_without_tls_configured_is_refused_by_policy() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.qcow2");
    create_image(&img, 1 << 20).await;
    let srv = TestServer::start(dir.path(), &[("", &img, true)]).await;
    let mut c = Raw::connect_with(&srv.socket, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).await;
    c.option(OPT_STARTTLS, &[]).await;
    assert_eq!(c.opt_reply().await.1, REP_ERR_POLICY);
    // The negotiation goes on in the clear.
    assert_eq!(c.go("", false, false).await.0, 1 << 20);
    srv.stop().await.unwrap();
}
