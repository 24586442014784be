//! rustls configuration for the device port.
//!
//! The handshake *requests* a client certificate but does not require one (EST enrollment
//! happens before a device has one). A certificate from another CA does not abort the
//! handshake either: its verification result travels with the connection as a
//! [`PeerCertificate`] so the HTTP layer can answer with a precise 401 rather than a bare
//! TLS alert. rustls still checks the client's proof of possession (CertificateVerify),
//! and every route that needs an identity calls [`crate::Authority::authenticate`],
//! which refuses unverified chains and consults the live registry.

use std::fmt;
use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier as RustlsVerifier};
use rustls::server::{ServerConfig, WebPkiClientVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};

use crate::Ca;

/// Why a presented chain does not verify against the CA.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ChainRejected {
    /// The client sent an empty certificate list.
    #[error("no certificate")]
    Empty,
    /// The certificate's validity ended.
    #[error("certificate expired")]
    Expired,
    /// The certificate's validity has not begun.
    #[error("certificate not valid yet")]
    NotValidYet,
    /// It does not chain to this CA (another CA, or self-signed).
    #[error("certificate not issued by this CA")]
    UnknownIssuer,
    /// A signature in the chain does not verify.
    #[error("bad signature in the certificate chain")]
    BadSignature,
    /// Not a client-authentication certificate (extended key usage).
    #[error("certificate not for client authentication")]
    NotForClientAuth,
    /// The certificate could not be parsed, or another check failed.
    #[error("{0}")]
    Invalid(String),
}

impl From<rustls::Error> for ChainRejected {
    fn from(e: rustls::Error) -> Self {
        use rustls::CertificateError as C;
        match e {
            rustls::Error::InvalidCertificate(C::Expired | C::ExpiredContext { .. }) => Self::Expired,
            rustls::Error::InvalidCertificate(C::NotValidYet | C::NotValidYetContext { .. }) => {
                Self::NotValidYet
            }
            rustls::Error::InvalidCertificate(C::UnknownIssuer) => Self::UnknownIssuer,
            rustls::Error::InvalidCertificate(C::BadSignature) => Self::BadSignature,
            rustls::Error::InvalidCertificate(C::InvalidPurpose | C::InvalidPurposeContext { .. }) => {
                Self::NotForClientAuth
            }
            other => Self::Invalid(other.to_string()),
        }
    }
}

/// The client certificate a connection presented, with the outcome of chain verification
/// against the CA. Inserted into every request's extensions by the listener.
#[derive(Clone)]
pub struct PeerCertificate {
    /// End-entity certificate first, then whatever intermediates the client sent.
    /// Shared: every request on the connection carries a cheap clone.
    pub chain: Arc<Vec<CertificateDer<'static>>>,
    /// `Ok` if the chain verified against this CA at handshake time; else why not.
    pub verified: Result<(), ChainRejected>,
    /// The connection's last successful authentication, tagged with the registry
    /// generation it was made under (see [`crate::Authority::authenticate`]).
    pub(crate) cached: Arc<std::sync::Mutex<Option<CachedAuth>>>,
}

/// A connection's last successful authentication and the registry generation it was made under.
pub(crate) type CachedAuth = (u64, Arc<crate::AuthenticatedDevice>);

impl PeerCertificate {
    /// The certificate a connection presented and the outcome of verifying it.
    pub fn new(chain: Vec<CertificateDer<'static>>, verified: Result<(), ChainRejected>) -> Self {
        Self { chain: Arc::new(chain), verified, cached: Arc::default() }
    }
}

impl fmt::Debug for PeerCertificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let fp = self.chain.first().map(|c| portcullis_core::Fingerprint::of(c));
        f.debug_struct("PeerCertificate").field("leaf", &fp).field("verified", &self.verified).finish()
    }
}

/// Verifies client chains against the CA (root and issuing CA as anchors, clientAuth EKU).
#[derive(Clone)]
pub struct ClientCertVerifier {
    inner: Arc<dyn RustlsVerifier>,
}

impl fmt::Debug for ClientCertVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClientCertVerifier")
    }
}

impl ClientCertVerifier {
    /// A verifier trusting `ca`.
    pub fn new(ca: &Ca) -> Result<Self, rustls::Error> {
        let mut roots = RootCertStore::empty();
        roots
            .add(CertificateDer::from(ca.root_der().to_vec()))
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        // The issuing CA is an anchor too, so a device that sends only its leaf (as many
        // embedded TLS stacks do) still verifies.
        roots
            .add(CertificateDer::from(ca.issuing_der().to_vec()))
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        let inner =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), portcullis_client::tls::provider())
                .allow_unauthenticated()
                .build()
                .map_err(|e| rustls::Error::General(e.to_string()))?;
        Ok(Self { inner })
    }

    /// Verifies a presented chain now.
    pub fn verify(&self, chain: &[CertificateDer<'static>]) -> Result<(), ChainRejected> {
        let Some((leaf, rest)) = chain.split_first() else {
            return Err(ChainRejected::Empty);
        };
        self.inner.verify_client_cert(leaf, rest, UnixTime::now()).map(|_| ()).map_err(ChainRejected::from)
    }
}

/// Accepts any chain at the handshake (the HTTP layer decides), but delegates the
/// signature checks that prove possession of the key.
#[derive(Debug)]
struct DeferredVerifier(Arc<dyn RustlsVerifier>);

impl RustlsVerifier for DeferredVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.0.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

pub use portcullis_client::tls::provider;

/// The device port's server configuration: our server chain, client certificates
/// requested, HTTP/2 or HTTP/1.1 via ALPN, the server's cipher suite order.
pub fn server_config(
    verifier: &ClientCertVerifier,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<ServerConfig>, rustls::Error> {
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(Arc::new(DeferredVerifier(verifier.inner.clone())))
        .with_single_cert(chain, key)?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    cfg.ignore_client_order = true;
    Ok(Arc::new(cfg))
}

#[cfg(test)]
mod chain_tests {
    use super::ChainRejected;
    use rustls::CertificateError as C;

    #[test]
    fn rustls_verdicts_become_typed_rejections() {
        let of = |e: C| ChainRejected::from(rustls::Error::InvalidCertificate(e));
        assert_eq!(of(C::UnknownIssuer), ChainRejected::UnknownIssuer);
        assert_eq!(of(C::Expired), ChainRejected::Expired);
        assert_eq!(of(C::NotValidYet), ChainRejected::NotValidYet);
        assert_eq!(of(C::BadSignature), ChainRejected::BadSignature);
        assert_eq!(of(C::InvalidPurpose), ChainRejected::NotForClientAuth);
        assert!(matches!(of(C::BadEncoding), ChainRejected::Invalid(_)));
        assert_eq!(
            crate::AuthError::from(ChainRejected::UnknownIssuer).to_string(),
            "client certificate not accepted: certificate not issued by this CA"
        );
    }
}
