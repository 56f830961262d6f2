//! TLS for `NBD_OPT_STARTTLS` (feature `tls`): rustls, TLS 1.3 only, ring as the crypto
//! provider, configured from a directory laid out as QEMU's `tls-creds-x509` wants it:
//!
//! ```text
//! DIR/ca-cert.pem       the CA that signs client certificates (needed with verify_peer)
//! DIR/ca-crl.pem        optional: certificates the CA revoked
//! DIR/server-cert.pem   this server's certificate (chain)
//! DIR/server-key.pem    its private key (PKCS#8, PKCS#1 or SEC1)
//! ```
//!
//! With `verify_peer` (QEMU's default) a client must present a certificate the CA signed,
//! as a QEMU server asks; without it any client that trusts our certificate gets in.

use std::io;
use std::path::Path;
use std::sync::Arc;

use tokio_rustls::TlsAcceptor;

use crate::connection::Stream;
use tokio_rustls::rustls::crypto::ring;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{
    CertificateDer, CertificateRevocationListDer, PrivateKeyDer,
};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{RootCertStore, ServerConfig, version};

/// A server's TLS credentials, ready to upgrade connections. Cheap to clone.
#[derive(Clone)]
pub struct TlsConfig {
    acceptor: TlsAcceptor,
}

impl std::fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsConfig")
    }
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

/// Every certificate in a PEM file (at least one).
fn certificates(path: &Path) -> io::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| {
            invalid(format!(
                "cannot read certificates from '{}': {e}",
                path.display()
            ))
        })?;
    if certs.is_empty() {
        return Err(invalid(format!("no certificate in '{}'", path.display())));
    }
    Ok(certs)
}

fn private_key(path: &Path) -> io::Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| {
        invalid(format!(
            "cannot read a private key from '{}': {e}",
            path.display()
        ))
    })
}

/// The CA's revocation lists, if the directory has `ca-crl.pem`.
fn revocations(dir: &Path) -> io::Result<Vec<CertificateRevocationListDer<'static>>> {
    let path = dir.join("ca-crl.pem");
    if !path.exists() {
        return Ok(Vec::new());
    }
    CertificateRevocationListDer::pem_file_iter(&path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| invalid(format!("cannot read '{}': {e}", path.display())))
}

impl TlsConfig {
    /// Load `server-cert.pem` and `server-key.pem` from `dir`; with `verify_peer`, also
    /// `ca-cert.pem` (and `ca-crl.pem` if present), and require client certificates it signed.
    pub fn from_x509_dir(dir: &Path, verify_peer: bool) -> io::Result<TlsConfig> {
        let provider = Arc::new(ring::default_provider());
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&version::TLS13])
            .map_err(|e| invalid(format!("TLS setup: {e}")))?;
        let builder = if verify_peer {
            let mut roots = RootCertStore::empty();
            for ca in certificates(&dir.join("ca-cert.pem"))? {
                roots
                    .add(ca)
                    .map_err(|e| invalid(format!("bad CA certificate: {e}")))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .with_crls(revocations(dir)?)
                .build()
                .map_err(|e| invalid(format!("client verification setup: {e}")))?;
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let chain = certificates(&dir.join("server-cert.pem"))?;
        let key = private_key(&dir.join("server-key.pem"))?;
        let config = builder
            .with_single_cert(chain, key)
            .map_err(|e| invalid(format!("server certificate and key: {e}")))?;
        Ok(TlsConfig {
            acceptor: TlsAcceptor::from(Arc::new(config)),
        })
    }

    /// Run the server side of a TLS handshake on `stream`.
    pub(crate) async fn upgrade(&self, stream: Box<dyn Stream>) -> io::Result<Box<dyn Stream>> {
        Ok(Box::new(self.acceptor.accept(stream).await?))
    }
}
