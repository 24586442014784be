use std::sync::{Arc, RwLock};
use std::time::Duration;

use portcullis_core::{DeviceId, DeviceState, Fingerprint, GroupName, Serial, Token, TrustDomain};
use portcullis_store::{
    Actor, CertificateRecord, Device, NewCertificate, NewDevice, NewToken, Store, TokenCheck,
};
use time::OffsetDateTime;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;

use crate::ca::{Ca, CaError, IssuedCert};
use crate::csr::{self, CsrError};
use crate::metrics::Metrics;
use crate::tls::PeerCertificate;

/// How the CA issues.
#[derive(Debug, Clone)]
pub struct IssuancePolicy {
    /// Lifetime of device certificates (default 30 days).
    pub device_cert_lifetime: Duration,
    /// Default lifetime of enrollment tokens (default 24 hours).
    pub token_ttl: Duration,
    /// `nextUpdate - thisUpdate` of published CRLs (default 7 days).
    pub crl_validity: Duration,
    /// At most this many re-enrollments per device within `reenroll_window` (default
    /// 10 per hour): a device renews once per lifetime; a loop or a stolen key does not
    /// get an endless supply of certificates.
    pub reenroll_limit: u32,
    /// The window of `reenroll_limit`.
    pub reenroll_window: Duration,
}

impl Default for IssuancePolicy {
    fn default() -> Self {
        Self {
            device_cert_lifetime: Duration::from_secs(30 * 86400),
            token_ttl: Duration::from_secs(86400),
            crl_validity: Duration::from_secs(7 * 86400),
            reenroll_limit: 10,
            reenroll_window: Duration::from_secs(3600),
        }
    }
}

/// Why a client certificate does not authenticate a device. Each variant is a decision
/// a caller can report precisely.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// No client certificate was presented.
    #[error("a client certificate is required")]
    NoCertificate,
    /// The chain does not verify against this CA.
    #[error("client certificate not accepted: {0}")]
    Untrusted(#[from] crate::ChainRejected),
    /// The certificate verified but names no device of this trust domain.
    #[error("client certificate does not name a device of this trust domain")]
    NotADevice,
    /// The certificate is not in the registry.
    #[error("client certificate {0} is not known to the registry")]
    UnknownCertificate(Serial),
    /// It expired since the connection was opened.
    #[error("client certificate expired at {not_after}")]
    Expired {
        /// When it expired.
        not_after: OffsetDateTime,
    },
    /// The certificate was revoked.
    #[error("certificate {0} has been revoked")]
    CertificateRevoked(Serial),
    /// The device is suspended.
    #[error("device {0} is suspended")]
    DeviceSuspended(DeviceId),
    /// The device is revoked.
    #[error("device {0} has been revoked")]
    DeviceRevoked(DeviceId),
    /// The registry could not be read; fail closed.
    #[error("registry unavailable")]
    Store(#[from] portcullis_store::Error),
}

impl AuthError {
    /// True if the client is known but not allowed (403) rather than unauthenticated (401).
    pub fn is_forbidden(&self) -> bool {
        matches!(self, Self::CertificateRevoked(_) | Self::DeviceSuspended(_) | Self::DeviceRevoked(_))
    }
}

/// A device proven by its client certificate and found active in the live registry.
#[derive(Debug, Clone)]
pub struct AuthenticatedDevice {
    /// Its id.
    pub id: DeviceId,
    /// Its group, as the registry says now.
    pub group: GroupName,
    /// Serial of the certificate it presented.
    pub serial: Serial,
    /// Fingerprint of that certificate.
    pub fingerprint: Fingerprint,
    /// When that certificate expires.
    pub not_after: OffsetDateTime,
}

/// Failures of registry and enrollment operations.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The CSR was refused.
    #[error(transparent)]
    Csr(#[from] CsrError),
    /// Unknown device or wrong token; deliberately indistinguishable.
    #[error("invalid device id or enrollment token")]
    BadCredentials,
    /// The token was used before.
    #[error("enrollment token has already been used")]
    TokenUsed,
    /// The token expired.
    #[error("enrollment token has expired")]
    TokenExpired,
    /// The device may not receive certificates in its state.
    #[error("device {id} is {state}")]
    DeviceNotActive {
        /// The device.
        id: DeviceId,
        /// Its state.
        state: DeviceState,
    },
    /// Client certificate authentication failed.
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// A name was invalid.
    #[error(transparent)]
    InvalidName(#[from] portcullis_core::InvalidName),
    /// The store refused or failed.
    #[error(transparent)]
    Store(portcullis_store::Error),
    /// Signing failed.
    #[error(transparent)]
    Ca(#[from] CaError),
    /// The certificate presented for re-enrollment was already superseded or revoked.
    #[error("certificate {0} was already superseded or revoked; re-enroll with the newest certificate")]
    Superseded(Serial),
    /// Too many re-enrollments of one device in the window.
    #[error("device {device} re-enrolled {count} times within {window_s} s; retry in {retry_s} s")]
    TooManyReenrollments {
        /// The device.
        device: DeviceId,
        /// Re-enrollments in the window.
        count: usize,
        /// The window, seconds.
        window_s: u64,
        /// When the next one is allowed, seconds from now.
        retry_s: u64,
    },
    /// A revocation reason that is not an RFC 5280 name this CA offers.
    #[error("unknown revocation reason {0:?}; one of {list}", list = crate::ca::CRL_REASONS.join(", "))]
    UnknownReason(String),
}

impl From<portcullis_store::Error> for Error {
    fn from(e: portcullis_store::Error) -> Self {
        match e {
            portcullis_store::Error::Token(TokenCheck::Used) => Self::TokenUsed,
            portcullis_store::Error::Token(TokenCheck::Expired) => Self::TokenExpired,
            portcullis_store::Error::Token(_) => Self::BadCredentials,
            portcullis_store::Error::InvalidTransition { id, from, action }
                if action == "enroll" || action == "re-enroll" =>
            {
                Self::DeviceNotActive { id, state: from }
            }
            e => Self::Store(e),
        }
    }
}

/// A newly registered device and its one-time token (shown once, stored hashed).
#[derive(Debug)]
pub struct Registered {
    /// The device.
    pub device: Device,
    /// Its enrollment token.
    pub token: Token,
    /// When the token expires.
    pub token_expires_at: OffsetDateTime,
}

/// The CA bound to the registry: every identity decision goes through here.
#[derive(Debug)]
pub struct Authority {
    ca: Ca,
    store: Arc<dyn Store>,
    policy: IssuancePolicy,
    crl: RwLock<Arc<Vec<u8>>>,
    metrics: Metrics,
}

impl Authority {
    /// Binds `ca` to `store` and signs a first CRL.
    pub async fn new(ca: Ca, store: Arc<dyn Store>, policy: IssuancePolicy) -> Result<Self, Error> {
        let a =
            Self { ca, store, policy, crl: RwLock::new(Arc::new(Vec::new())), metrics: Metrics::default() };
        a.refresh_crl().await?;
        Ok(a)
    }

    /// The CA.
    pub fn ca(&self) -> &Ca {
        &self.ca
    }

    /// The registry store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The issuance policy.
    pub fn policy(&self) -> &IssuancePolicy {
        &self.policy
    }

    /// Counters for `/metrics`.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        self.ca.trust_domain()
    }

    fn expiry(&self, ttl: Option<Duration>) -> OffsetDateTime {
        let ttl = ttl.unwrap_or(self.policy.token_ttl);
        OffsetDateTime::now_utc() + time::Duration::try_from(ttl).unwrap_or(time::Duration::days(1))
    }

    /// Registers a device and returns its first enrollment token.
    pub async fn register(
        &self,
        id: DeviceId,
        group: Option<GroupName>,
        token_ttl: Option<Duration>,
        actor: Actor,
    ) -> Result<Registered, Error> {
        let token = Token::generate("pct");
        let expires_at = self.expiry(token_ttl);
        let device = self
            .store
            .create_device(
                NewDevice { id, group: group.unwrap_or_else(GroupName::default_group) },
                NewToken { hash: token.hash(), expires_at },
                actor,
            )
            .await?;
        Ok(Registered { device, token, token_expires_at: expires_at })
    }

    /// Issues another enrollment token for a device (e.g. after losing its key).
    pub async fn new_token(
        &self,
        id: &DeviceId,
        ttl: Option<Duration>,
        actor: Actor,
    ) -> Result<(Token, OffsetDateTime), Error> {
        let token = Token::generate("pct");
        let expires_at = self.expiry(ttl);
        self.store.add_token(id, NewToken { hash: token.hash(), expires_at }, actor).await?;
        Ok((token, expires_at))
    }

    /// EST simpleenroll: authenticates `device:token`, validates the CSR, issues and
    /// durably records the certificate. Nothing is issued unless every check passes.
    pub async fn enroll(&self, device: &str, token: &Token, body: &[u8]) -> Result<IssuedCert, Error> {
        let r = self.enroll_inner(device, token, body).await;
        self.metrics.enrollment("enroll", outcome(&r));
        r
    }

    async fn enroll_inner(&self, device: &str, token: &Token, body: &[u8]) -> Result<IssuedCert, Error> {
        let id = DeviceId::try_new(device).map_err(|_| Error::BadCredentials)?;
        let now = OffsetDateTime::now_utc();
        let hash = token.hash();
        let Some((state, check)) = self.store.check_token(&id, &hash, now).await? else {
            return Err(Error::BadCredentials);
        };
        if check == TokenCheck::Unknown {
            return Err(Error::BadCredentials);
        }
        // The caller holds a token of this device, so it may learn the device's state.
        if state != DeviceState::Active {
            return Err(Error::DeviceNotActive { id, state });
        }
        if check != TokenCheck::Valid {
            return Err(portcullis_store::Error::Token(check).into());
        }
        let csr = csr::parse_est_body(body)?;
        let issued = self.ca.issue_device(&id, &csr, self.policy.device_cert_lifetime)?;
        // The token is consumed in the same transaction that records the certificate; a
        // concurrent use of the same token loses here and its certificate is discarded
        // unseen.
        let retired = self.store.enroll(&hash, self.new_certificate(&id, &issued, "enroll"), now).await?;
        if retired > 0 {
            // Re-provisioned: the earlier certificates are revoked as of now.
            self.refresh_crl().await?;
        }
        tracing::info!(device = %id, serial = %issued.serial, key = %csr.key_kind(), retired, "enrolled");
        Ok(issued)
    }

    /// EST simplereenroll: a fresh certificate for an authenticated, active device.
    pub async fn reenroll(&self, device: &AuthenticatedDevice, body: &[u8]) -> Result<IssuedCert, Error> {
        let r = self.reenroll_inner(device, body).await;
        self.metrics.enrollment("reenroll", outcome(&r));
        r
    }

    async fn reenroll_inner(&self, device: &AuthenticatedDevice, body: &[u8]) -> Result<IssuedCert, Error> {
        let csr = csr::parse_est_body(body)?;
        self.check_reenroll_rate(&device.id).await?;
        let issued = self.ca.issue_device(&device.id, &csr, self.policy.device_cert_lifetime)?;
        let recorded = self
            .store
            .record_certificate(
                self.new_certificate(&device.id, &issued, "reenroll"),
                &device.serial,
                Actor::Device(device.id.clone()),
            )
            .await;
        if let Err(portcullis_store::Error::NotValid { .. }) = recorded {
            return Err(Error::Superseded(device.serial.clone()));
        }
        recorded?;
        // The certificate it came with is revoked now (the store announced it: no
        // connection keeps using it).
        self.refresh_crl().await?;
        tracing::info!(device = %device.id, serial = %issued.serial, superseded = %device.serial, "re-enrolled");
        Ok(issued)
    }

    /// Refuses a re-enrollment beyond `reenroll_limit` within `reenroll_window`, counted
    /// from the registry (so it holds across restarts).
    async fn check_reenroll_rate(&self, id: &DeviceId) -> Result<(), Error> {
        let window = time::Duration::try_from(self.policy.reenroll_window).unwrap_or(time::Duration::HOUR);
        let since = OffsetDateTime::now_utc() - window;
        let mut recent: Vec<OffsetDateTime> = self
            .store
            .certificates(Some(id))
            .await?
            .into_iter()
            .filter(|c| c.issued_via == "reenroll" && c.issued_at > since)
            .map(|c| c.issued_at)
            .collect();
        let limit = usize::try_from(self.policy.reenroll_limit).unwrap_or(usize::MAX);
        if recent.len() < limit {
            return Ok(());
        }
        recent.sort();
        // The next one is allowed when the oldest counted leaves the window.
        let frees = recent[recent.len() - limit] + window;
        let retry_s = u64::try_from((frees - OffsetDateTime::now_utc()).whole_seconds()).unwrap_or(0) + 1;
        Err(Error::TooManyReenrollments {
            device: id.clone(),
            count: recent.len(),
            window_s: self.policy.reenroll_window.as_secs(),
            retry_s,
        })
    }

    /// Revokes one certificate (`reason`: an RFC 5280 name from [`crate::ca::CRL_REASONS`]),
    /// re-signs the CRL and cuts off connections that use it.
    pub async fn revoke_certificate(
        &self,
        serial: &Serial,
        reason: &str,
        note: Option<String>,
        actor: Actor,
    ) -> Result<CertificateRecord, Error> {
        if !crate::ca::CRL_REASONS.contains(&reason) {
            return Err(Error::UnknownReason(reason.to_owned()));
        }
        let cert = self.store.revoke_certificate(serial, reason, note, actor).await?;
        self.refresh_crl().await?;
        tracing::info!(serial = %serial, device = %cert.device, reason, "certificate revoked");
        Ok(cert)
    }

    fn new_certificate(&self, id: &DeviceId, c: &IssuedCert, via: &'static str) -> NewCertificate {
        NewCertificate {
            serial: c.serial.clone(),
            device: id.clone(),
            fingerprint: c.fingerprint.clone(),
            spki_sha256: c.spki_sha256.clone(),
            not_before: c.not_before,
            not_after: c.not_after,
            issued_via: via,
            der: c.der.clone(),
        }
    }

    /// Authenticates a connection's client certificate against the CA and the *live*
    /// registry. Call per request: a resumed or long-lived connection must not outlive a
    /// revocation.
    pub async fn authenticate(
        &self,
        peer: Option<&PeerCertificate>,
    ) -> Result<Arc<AuthenticatedDevice>, AuthError> {
        let r = self.authenticate_inner(peer).await;
        self.metrics.client_auth(match &r {
            Ok(_) => "ok",
            Err(AuthError::NoCertificate) => "no_certificate",
            Err(AuthError::Untrusted(_)) => "untrusted",
            Err(AuthError::NotADevice | AuthError::UnknownCertificate(_)) => "unknown",
            Err(AuthError::Expired { .. }) => "expired",
            Err(AuthError::CertificateRevoked(_) | AuthError::DeviceRevoked(_)) => "revoked",
            Err(AuthError::DeviceSuspended(_)) => "suspended",
            Err(AuthError::Store(_)) => "error",
        });
        r
    }

    async fn authenticate_inner(
        &self,
        peer: Option<&PeerCertificate>,
    ) -> Result<Arc<AuthenticatedDevice>, AuthError> {
        let peer = peer.ok_or(AuthError::NoCertificate)?;
        // Reuse this connection's last answer while no registry state has changed since:
        // the store moves the generation after every such write commits and before the
        // writer hears back, so the next request after one re-reads the registry.
        let generation = self.store.changes().generation();
        if let Ok(cached) = peer.cached.lock()
            && let Some((g, device)) = cached.as_ref()
            && *g == generation
        {
            if device.not_after <= OffsetDateTime::now_utc() {
                return Err(AuthError::Expired { not_after: device.not_after });
            }
            return Ok(device.clone());
        }
        let device = Arc::new(self.authenticate_fresh(peer).await?);
        if let Ok(mut cached) = peer.cached.lock() {
            *cached = Some((generation, device.clone()));
        }
        Ok(device)
    }

    async fn authenticate_fresh(&self, peer: &PeerCertificate) -> Result<AuthenticatedDevice, AuthError> {
        peer.verified.clone()?;
        let leaf = peer.chain.first().ok_or(AuthError::NoCertificate)?;
        let (_, cert) = x509_parser::certificate::X509Certificate::from_der(leaf)
            .map_err(|e| crate::ChainRejected::Invalid(e.to_string()))?;
        let serial = Serial::from_bytes(cert.raw_serial());
        let named = cert
            .subject_alternative_name()
            .ok()
            .flatten()
            .and_then(|san| {
                san.value.general_names.iter().find_map(|g| match g {
                    GeneralName::URI(u) => self.trust_domain().device_from_uri(u),
                    _ => None,
                })
            })
            .ok_or(AuthError::NotADevice)?;
        let status = self
            .store
            .certificate(&serial)
            .await?
            .ok_or_else(|| AuthError::UnknownCertificate(serial.clone()))?;
        let (record, state) = (&status.certificate, status.device_state);
        let fingerprint = Fingerprint::of(leaf);
        if record.device != named || record.fingerprint != fingerprint {
            return Err(AuthError::UnknownCertificate(serial));
        }
        match state {
            DeviceState::Active => {}
            DeviceState::Suspended => return Err(AuthError::DeviceSuspended(named)),
            DeviceState::Revoked => return Err(AuthError::DeviceRevoked(named)),
        }
        if record.state == portcullis_core::CertState::Revoked {
            return Err(AuthError::CertificateRevoked(serial));
        }
        if record.not_after <= OffsetDateTime::now_utc() {
            return Err(AuthError::Expired { not_after: record.not_after });
        }
        Ok(AuthenticatedDevice {
            id: named,
            group: status.group,
            serial,
            fingerprint,
            not_after: record.not_after,
        })
    }

    /// Suspends, resumes or revokes a device. Revocation re-signs the CRL before returning.
    pub async fn set_state(
        &self,
        id: &DeviceId,
        to: DeviceState,
        reason: Option<String>,
        actor: Actor,
    ) -> Result<Device, Error> {
        let device = self.store.set_device_state(id, to, reason, actor).await?;
        tracing::info!(device = %id, state = %to, "device state changed");
        self.metrics.state_change(to.as_str());
        if to == DeviceState::Revoked {
            self.refresh_crl().await?;
        }
        Ok(device)
    }

    /// Replaces the source addresses of a device (for DNS attribution); listeners that
    /// attribute by address see the change at their next look at [`Self::generation`].
    pub async fn set_addresses(
        &self,
        id: &DeviceId,
        addresses: &[portcullis_core::Cidr],
        actor: Actor,
    ) -> Result<Device, Error> {
        let mut list: Vec<String> = addresses.iter().map(ToString::to_string).collect();
        list.sort();
        list.dedup();
        let device = self.store.set_device_addresses(id, list, actor).await?;
        tracing::info!(device = %id, addresses = ?device.addresses, "device addresses changed");
        Ok(device)
    }

    /// The store's generation: moved by every write that authentication or policy
    /// depends on (device state, certificates, addresses, profiles), announced by the
    /// store itself. A listener that keeps a view of the registry rebuilds it when this
    /// moves (or waits on `store().changes().subscribe()`).
    pub fn generation(&self) -> u64 {
        self.store.changes().generation()
    }

    /// The CA's background task: re-signs the CRL at a quarter of its validity, so the
    /// published one never lapses (revocations re-sign it at once, in `revoke`).
    pub fn start(self: &Arc<Self>, stop: portcullis_net::Shutdown) -> portcullis_net::Tasks {
        let mut tasks = portcullis_net::Tasks::new();
        let authority = self.clone();
        tasks.every(self.policy.crl_validity / 4, portcullis_net::First::AfterPeriod, stop, move || {
            let authority = authority.clone();
            async move {
                if let Err(e) = authority.refresh_crl().await {
                    tracing::error!(error = %e, "cannot re-sign the CRL");
                }
            }
        });
        tasks
    }

    /// Re-signs the CRL from the registry.
    pub async fn refresh_crl(&self) -> Result<(), Error> {
        let revoked = self.store.revoked(OffsetDateTime::now_utc()).await?;
        let number = self.store.next_crl_number().await?;
        let der = self.ca.crl(&revoked, number, self.policy.crl_validity)?;
        if let Ok(mut slot) = self.crl.write() {
            *slot = Arc::new(der);
        }
        self.metrics.crl_signed();
        tracing::debug!(number, entries = revoked.len(), "signed CRL");
        Ok(())
    }

    /// The current CRL, DER.
    pub fn crl_der(&self) -> Arc<Vec<u8>> {
        self.crl.read().map(|c| c.clone()).unwrap_or_default()
    }

    /// The current CRL, PEM.
    pub fn crl_pem(&self) -> String {
        portcullis_client::files::pem_encode("X509 CRL", self.crl_der().as_slice())
    }
}

fn outcome<T>(r: &Result<T, Error>) -> &'static str {
    match r {
        Ok(_) => "issued",
        Err(Error::BadCredentials) => "bad_credentials",
        Err(Error::TokenUsed) => "token_used",
        Err(Error::TokenExpired) => "token_expired",
        Err(Error::DeviceNotActive { .. }) => "device_not_active",
        Err(Error::Csr(
            CsrError::WeakKey { .. } | CsrError::UnsupportedKey(_) | CsrError::WeakSignature(_),
        )) => "key_rejected",
        Err(Error::Csr(_)) => "csr_invalid",
        Err(_) => "error",
    }
}
