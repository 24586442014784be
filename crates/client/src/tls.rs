//! TLS pieces every side uses, written once: the tree's one crypto provider, trust roots
//! from a CA file or the system store, and a client config over them.

use std::path::Path;
use std::sync::{Arc, OnceLock};

use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

/// Why trust roots or a TLS config could not be had.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// The CA file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The PEM held something that is not a usable certificate.
    #[error("{what}: {reason}")]
    BadCertificate {
        /// Where it came from (a path, "CA file").
        what: String,
        /// Why it was refused.
        reason: String,
    },
    /// No certificate at all where roots were expected.
    #[error("{0}: no PEM certificate")]
    Empty(String),
    /// The system store is empty or unreadable.
    #[error("no system CA certificates found")]
    NoSystemRoots,
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// The one crypto provider of the whole tree (ring), servers and clients alike: ring's
/// suites, AES-128-GCM preferred (as strong as needed, and cheaper per handshake than
/// the SHA-384 suites for small devices).
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            use rustls::crypto::ring::cipher_suite as cs;
            let mut p = rustls::crypto::ring::default_provider();
            p.cipher_suites = vec![
                cs::TLS13_AES_128_GCM_SHA256,
                cs::TLS13_AES_256_GCM_SHA384,
                cs::TLS13_CHACHA20_POLY1305_SHA256,
                cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
                cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
                cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
                // Never chosen with our ECDSA server keys; kept for upstreams (gateway
                // routes, DoT/DoH, list downloads) that still serve RSA over TLS 1.2.
                cs::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
                cs::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
                cs::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
            ];
            Arc::new(p)
        })
        .clone()
}

/// Roots from the PEM certificates in `pem` (at least one); `what` names the source in
/// errors.
pub fn roots_from_pem(pem: &[u8], what: &str) -> Result<RootCertStore, TlsError> {
    let bad = |reason: String| TlsError::BadCertificate { what: what.to_owned(), reason };
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem) {
        roots.add(cert.map_err(|e| bad(e.to_string()))?).map_err(|e| bad(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(TlsError::Empty(what.to_owned()));
    }
    Ok(roots)
}

/// Roots from a PEM CA file (at least one certificate).
pub fn roots_from_file(path: &Path) -> Result<RootCertStore, TlsError> {
    let what = path.display().to_string();
    let pem = std::fs::read(path).map_err(|source| TlsError::Read { path: what.clone(), source })?;
    roots_from_pem(&pem, &what)
}

/// The system's trust store (at least one certificate).
pub fn system_roots() -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    if roots.is_empty() { Err(TlsError::NoSystemRoots) } else { Ok(roots) }
}

/// The roots in `ca_file` when given, else the system's.
pub fn trust_roots(ca_file: Option<&Path>) -> Result<RootCertStore, TlsError> {
    match ca_file {
        Some(path) => roots_from_file(path),
        None => system_roots(),
    }
}

/// A client config on [`provider`] that verifies servers against `roots` and presents
/// no certificate.
pub fn client_config(roots: impl Into<Arc<RootCertStore>>) -> Result<rustls::ClientConfig, TlsError> {
    Ok(rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_provider_has_every_ring_suite_with_aes_128_first() {
        let mut ours: Vec<_> = provider().cipher_suites.iter().map(|s| s.suite()).collect();
        assert_eq!(ours[0], rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
        let mut ring: Vec<_> =
            rustls::crypto::ring::default_provider().cipher_suites.iter().map(|s| s.suite()).collect();
        ours.sort_by_key(|s| u16::from(*s));
        ring.sort_by_key(|s| u16::from(*s));
        assert_eq!(ours, ring);
    }

    #[test]
    fn refuses_empty_and_garbled_roots_by_name() {
        let err = roots_from_pem(b"", "ca.pem").unwrap_err();
        assert_eq!(err.to_string(), "ca.pem: no PEM certificate");
        let garbled = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
        assert!(matches!(roots_from_pem(garbled, "ca.pem"), Err(TlsError::BadCertificate { .. })));
        assert!(matches!(roots_from_file(Path::new("/nonexistent/ca.pem")), Err(TlsError::Read { .. })));
    }
}
