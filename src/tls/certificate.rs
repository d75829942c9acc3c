//! The server's certificate chain and key: read from PEM files, checked against each other, and
//! swapped whole on reload. A connection's handshake takes the rustls configuration current when
//! it starts, so a reload changes what new connections are served and nothing else.

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures_rustls::rustls::crypto::ring;
use futures_rustls::rustls::pki_types::pem::PemObject;
use futures_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use futures_rustls::rustls::{self, ServerConfig};

use crate::tls::Acceptor;

/// The certificate and key files, as `--tls-cert` and `--tls-key` name them.
#[derive(Debug, Clone)]
pub struct CertificateFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The certificate in force, and where it was read from.
pub struct ServerCertificate {
    files: CertificateFiles,
    current: RefCell<Acceptor>,
    /// How many certificates the chain in force has, for the log lines.
    chain_len: RefCell<usize>,
}

impl ServerCertificate {
    /// Reads and checks the files; the error names the file and what is wrong with it.
    pub fn load(files: CertificateFiles) -> Result<ServerCertificate, String> {
        let (config, chain_len) = server_config(&files)?;
        Ok(ServerCertificate {
            files,
            current: RefCell::new(Acceptor::from(config)),
            chain_len: RefCell::new(chain_len),
        })
    }

    /// Reads the files again and, if they are good, serves them to every new connection;
    /// otherwise keeps the certificate in force. Connections already made are not touched.
    pub fn reload(&self) -> Result<(), String> {
        let (config, chain_len) = server_config(&self.files)?;
        *self.current.borrow_mut() = Acceptor::from(config);
        *self.chain_len.borrow_mut() = chain_len;
        Ok(())
    }

    /// What a new connection's handshake uses (a reference count, not a copy).
    pub fn acceptor(&self) -> Acceptor {
        self.current.borrow().clone()
    }

    /// `/path/to/cert (N certificates)`, for log lines.
    pub fn describe(&self) -> String {
        let count = *self.chain_len.borrow();
        let plural = if count == 1 { "" } else { "s" };
        format!("{} ({count} certificate{plural} in the chain)", self.files.cert.display())
    }
}

/// The rustls server configuration for these files, and the length of the chain.
fn server_config(files: &CertificateFiles) -> Result<(Arc<ServerConfig>, usize), String> {
    let chain = read_chain(&files.cert)?;
    let key = read_key(&files.key)?;
    let chain_len = chain.len();
    let provider = Arc::new(ring::default_provider());
    let config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|error| format!("TLS: {error}"))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|error| match error {
            rustls::Error::InconsistentKeys(_) => format!(
                "the TLS key {} does not match the certificate {} (--tls-key, --tls-cert)",
                files.key.display(),
                files.cert.display()
            ),
            error => format!(
                "cannot use the TLS certificate {} with the key {}: {error}",
                files.cert.display(),
                files.key.display()
            ),
        })?;
    Ok((Arc::new(config), chain_len))
}

fn read(path: &Path, what: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|error| format!("cannot read the TLS {what} {}: {error}", path.display()))
}

/// The chain in a PEM file, the server's own certificate first.
fn read_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = read(path, "certificate (--tls-cert)")?;
    let chain = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| format!("the TLS certificate {} is not valid PEM: {error}", path.display()))?;
    if chain.is_empty() {
        return Err(format!(
            "no certificate in {} (--tls-cert): expected PEM \"-----BEGIN CERTIFICATE-----\"",
            path.display()
        ));
    }
    Ok(chain)
}

/// The first private key in a PEM file (PKCS#8, SEC1 or PKCS#1).
fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let pem = read(path, "key (--tls-key)")?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|error| match error {
        rustls::pki_types::pem::Error::NoItemsFound => format!(
            "no private key in {} (--tls-key): expected PEM \"-----BEGIN PRIVATE KEY-----\"",
            path.display()
        ),
        error => format!("the TLS key {} is not valid PEM: {error}", path.display()),
    })
}
