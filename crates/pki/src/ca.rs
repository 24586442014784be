use std::fmt;
use std::fs;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use portcullis_core::{DeviceId, Fingerprint, Serial, TrustDomain, random_bytes};
use portcullis_store::RevokedEntry;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
    RevokedCertParams, SanType, SerialNumber,
};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::csr::ValidCsr;
use portcullis_client::files::{write_private, write_public};

/// Why the CA could not be created, loaded or used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CaError {
    /// `init` found a CA already in place.
    #[error("a CA already exists in {0} (refusing to overwrite it)")]
    AlreadyExists(PathBuf),
    /// No CA in the data dir.
    #[error("no CA in {0}; run `portcullis init` first")]
    Missing(PathBuf),
    /// A CA file could not be read or written.
    #[error("{action} {path}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// A CA file is not what it should be.
    #[error("invalid CA file {path}: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Certificate generation failed.
    #[error("certificate generation failed")]
    Generate(#[from] rcgen::Error),
}

/// A certificate the CA just issued.
#[derive(Clone)]
pub struct IssuedCert {
    /// DER encoding.
    pub der: Vec<u8>,
    /// Its serial.
    pub serial: Serial,
    /// SHA-256 of the DER.
    pub fingerprint: Fingerprint,
    /// SHA-256 of the subject public key info, hex.
    pub spki_sha256: String,
    /// Validity start.
    pub not_before: OffsetDateTime,
    /// Validity end.
    pub not_after: OffsetDateTime,
}

impl fmt::Debug for IssuedCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuedCert")
            .field("serial", &self.serial)
            .field("fingerprint", &self.fingerprint)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// The device port's TLS identity: certificate chain and key, PEM.
pub struct ServerIdentity {
    /// Server certificate followed by the issuing CA, PEM.
    pub chain_pem: String,
    /// The server's private key, PEM. Never log this.
    pub key_pem: String,
}

impl fmt::Debug for ServerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerIdentity").field("key_pem", &"<redacted>").finish_non_exhaustive()
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct CaMeta {
    trust_domain: TrustDomain,
    #[serde(with = "time::serde::rfc3339")]
    created_at: OffsetDateTime,
}

const ROOT_CERT: &str = "root.crt";
const ROOT_KEY: &str = "root.key";
const ISSUING_CERT: &str = "issuing.crt";
const ISSUING_KEY: &str = "issuing.key";
const META: &str = "ca.json";

const ROOT_LIFETIME: time::Duration = time::Duration::days(3650);
const ISSUING_LIFETIME: time::Duration = time::Duration::days(1825);
/// Tolerated clock skew between CA and devices.
const BACKDATE: time::Duration = time::Duration::minutes(5);

/// The private CA: a root and an issuing CA, both ECDSA P-256.
///
/// The root key signs only the issuing CA. The issuing key signs device and server
/// certificates and CRLs. `Debug` never shows key material.
pub struct Ca {
    dir: PathBuf,
    trust_domain: TrustDomain,
    root_der: Vec<u8>,
    issuing_der: Vec<u8>,
    issuer: Issuer<'static, KeyPair>,
}

impl fmt::Debug for Ca {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ca")
            .field("dir", &self.dir)
            .field("trust_domain", &self.trust_domain)
            .field("root", &Fingerprint::of(&self.root_der))
            .field("issuing", &Fingerprint::of(&self.issuing_der))
            .finish_non_exhaustive()
    }
}

fn io<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> CaError + 'a {
    move |source| CaError::Io { action, path: path.to_path_buf(), source }
}

fn read_string(path: &Path) -> Result<String, CaError> {
    fs::read_to_string(path).map_err(io("cannot read", path))
}

fn pem_to_der(path: &Path, pem: &str) -> Result<Vec<u8>, CaError> {
    let mut it = rustls::pki_types::pem::PemObject::pem_slice_iter(pem.as_bytes());
    let first: Option<Result<rustls::pki_types::CertificateDer<'static>, _>> = it.next();
    match first {
        Some(Ok(c)) => Ok(c.to_vec()),
        _ => Err(CaError::Invalid { path: path.to_path_buf(), reason: "no PEM certificate".into() }),
    }
}

fn random_serial() -> SerialNumber {
    // 128 random bits; rcgen encodes them as a positive INTEGER (RFC 5280 4.1.2.2).
    SerialNumber::from_slice(&random_bytes::<16>())
}

fn dn(cn: &str, org: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, org);
    dn.push(DnType::CommonName, cn);
    dn
}

/// The PEM encoding of a DER certificate.
pub(crate) fn cert_pem(der: &[u8]) -> String {
    portcullis_client::files::pem_encode("CERTIFICATE", der)
}

impl Ca {
    /// True if `dir` already holds a CA.
    pub fn exists(dir: &Path) -> bool {
        dir.join(ROOT_CERT).exists() || dir.join(ISSUING_KEY).exists()
    }

    /// Creates a root and an issuing CA in `dir` (created mode 0700). Refuses to overwrite.
    pub fn init(dir: &Path, trust_domain: TrustDomain) -> Result<Self, CaError> {
        if Self::exists(dir) {
            return Err(CaError::AlreadyExists(dir.to_path_buf()));
        }
        create_private_dir(dir)?;
        let now = OffsetDateTime::now_utc();

        let root_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut root = CertificateParams::default();
        root.distinguished_name = dn("Portcullis Root CA", trust_domain.as_str());
        root.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
        root.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        root.not_before = now - BACKDATE;
        root.not_after = now + ROOT_LIFETIME;
        root.serial_number = Some(random_serial());
        root.key_identifier_method = KeyIdMethod::Sha256;
        let root_cert = root.self_signed(&root_key)?;
        let root_issuer = Issuer::new(root, &root_key);

        let issuing_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut issuing = CertificateParams::default();
        issuing.distinguished_name = dn("Portcullis Issuing CA", trust_domain.as_str());
        issuing.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        issuing.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        issuing.not_before = now - BACKDATE;
        issuing.not_after = now + ISSUING_LIFETIME;
        issuing.serial_number = Some(random_serial());
        issuing.use_authority_key_identifier_extension = true;
        issuing.key_identifier_method = KeyIdMethod::Sha256;
        let issuing_cert = issuing.signed_by(&issuing_key, &root_issuer)?;

        // Keys first: a crash between files leaves `exists` true and nothing half-usable.
        let p = |n: &str| dir.join(n);
        write_private(&p(ROOT_KEY), root_key.serialize_pem().as_bytes())
            .map_err(io("cannot write", &p(ROOT_KEY)))?;
        write_private(&p(ISSUING_KEY), issuing_key.serialize_pem().as_bytes())
            .map_err(io("cannot write", &p(ISSUING_KEY)))?;
        write_public(&p(ISSUING_CERT), issuing_cert.pem().as_bytes())
            .map_err(io("cannot write", &p(ISSUING_CERT)))?;
        let meta = CaMeta { trust_domain: trust_domain.clone(), created_at: now };
        let meta_json = serde_json::to_vec_pretty(&meta).unwrap_or_default();
        write_public(&p(META), &meta_json).map_err(io("cannot write", &p(META)))?;
        write_public(&p(ROOT_CERT), root_cert.pem().as_bytes()).map_err(io("cannot write", &p(ROOT_CERT)))?;
        tracing::info!(
            dir = %dir.display(),
            trust_domain = %trust_domain,
            root = %Fingerprint::of(root_cert.der()),
            issuing = %Fingerprint::of(issuing_cert.der()),
            "created CA"
        );
        Self::load(dir)
    }

    /// Loads the CA from `dir`, checking that key files are private.
    pub fn load(dir: &Path) -> Result<Self, CaError> {
        if !dir.join(ROOT_CERT).exists() {
            return Err(CaError::Missing(dir.to_path_buf()));
        }
        let meta_path = dir.join(META);
        let meta: CaMeta = serde_json::from_str(&read_string(&meta_path)?)
            .map_err(|e| CaError::Invalid { path: meta_path.clone(), reason: e.to_string() })?;
        let root_path = dir.join(ROOT_CERT);
        let root_der = pem_to_der(&root_path, &read_string(&root_path)?)?;
        let issuing_path = dir.join(ISSUING_CERT);
        let issuing_pem = read_string(&issuing_path)?;
        let issuing_der = pem_to_der(&issuing_path, &issuing_pem)?;
        let key_path = dir.join(ISSUING_KEY);
        check_private(&key_path)?;
        let key = KeyPair::from_pem(&read_string(&key_path)?).map_err(|_| CaError::Invalid {
            path: key_path.clone(),
            reason: "not a PEM private key".into(),
        })?;
        let issuer = Issuer::from_ca_cert_der(&issuing_der.as_slice().into(), key)
            .map_err(|e| CaError::Invalid { path: issuing_path.clone(), reason: e.to_string() })?;
        Ok(Self { dir: dir.to_path_buf(), trust_domain: meta.trust_domain, root_der, issuing_der, issuer })
    }

    /// The trust domain of every device identity this CA issues.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The root CA certificate, DER.
    pub fn root_der(&self) -> &[u8] {
        &self.root_der
    }

    /// The issuing CA certificate, DER.
    pub fn issuing_der(&self) -> &[u8] {
        &self.issuing_der
    }

    /// The root CA certificate, PEM.
    pub fn root_pem(&self) -> String {
        cert_pem(&self.root_der)
    }

    /// The issuing CA certificate, PEM.
    pub fn issuing_pem(&self) -> String {
        cert_pem(&self.issuing_der)
    }

    /// Issues a device certificate for the key in `csr`. Only the key is taken from the
    /// request: subject, SAN, key usage and lifetime are the CA's decision.
    pub fn issue_device(
        &self,
        device: &DeviceId,
        csr: &ValidCsr,
        lifetime: Duration,
    ) -> Result<IssuedCert, CaError> {
        let now = OffsetDateTime::now_utc();
        let mut p = CertificateParams::default();
        p.distinguished_name = {
            let mut dn = DistinguishedName::new();
            dn.push(DnType::CommonName, device.as_str());
            dn
        };
        let uri = self.trust_domain.device_uri(device);
        p.subject_alt_names = vec![SanType::URI(uri.try_into().map_err(|_| {
            rcgen::Error::InvalidAsn1String(rcgen::InvalidAsn1String::Ia5String("device uri".into()))
        })?)];
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(p, csr.public_key(), now, lifetime)
    }

    fn sign(
        &self,
        mut p: CertificateParams,
        key: &impl rcgen::PublicKeyData,
        now: OffsetDateTime,
        lifetime: Duration,
    ) -> Result<IssuedCert, CaError> {
        let serial_bytes = random_bytes::<16>();
        p.serial_number = Some(SerialNumber::from_slice(&serial_bytes));
        let lifetime = time::Duration::try_from(lifetime).unwrap_or(time::Duration::days(30));
        // Backdate for clock skew, but never by more than a tenth of a short lifetime.
        p.not_before = now - BACKDATE.min(lifetime / 10);
        p.not_after = now + lifetime;
        p.use_authority_key_identifier_extension = true;
        p.key_identifier_method = KeyIdMethod::Sha256;
        let cert = p.signed_by(key, &self.issuer)?;
        let der = cert.der().to_vec();
        let spki = key.subject_public_key_info();
        Ok(IssuedCert {
            serial: Serial::from_bytes(&serial_bytes),
            fingerprint: Fingerprint::of(&der),
            spki_sha256: Fingerprint::of(&spki).to_string(),
            not_before: p.not_before,
            not_after: p.not_after,
            der,
        })
    }

    /// Issues a TLS server certificate for `names` (DNS names or IP addresses) with a
    /// fresh P-256 key.
    pub fn issue_server(&self, names: &[String], lifetime: Duration) -> Result<ServerIdentity, CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut p = CertificateParams::default();
        p.distinguished_name = {
            let mut dn = DistinguishedName::new();
            dn.push(DnType::CommonName, names.first().map(String::as_str).unwrap_or("portcullis"));
            dn
        };
        let mut sans = Vec::new();
        for n in names {
            sans.push(match n.parse::<IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(n.clone().try_into()?),
            });
        }
        p.subject_alt_names = sans;
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let issued = self.sign(p, &key, OffsetDateTime::now_utc(), lifetime)?;
        Ok(ServerIdentity {
            chain_pem: format!("{}{}", cert_pem(&issued.der), self.issuing_pem()),
            key_pem: key.serialize_pem(),
        })
    }

    /// Signs a CRL listing `revoked`, valid until `next_update`.
    pub fn crl(
        &self,
        revoked: &[RevokedEntry],
        number: u64,
        next_update: Duration,
    ) -> Result<Vec<u8>, CaError> {
        let now = OffsetDateTime::now_utc();
        let params = CertificateRevocationListParams {
            this_update: now,
            next_update: now + time::Duration::try_from(next_update).unwrap_or(time::Duration::days(7)),
            crl_number: SerialNumber::from(number),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .map(|r| RevokedCertParams {
                    serial_number: SerialNumber::from_slice(&r.serial.to_bytes()),
                    revocation_time: r.revoked_at,
                    reason_code: r.reason.as_deref().and_then(crl_reason),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        };
        Ok(params.signed_by(&self.issuer)?.der().to_vec())
    }

    /// The data dir holding the CA files.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// The RFC 5280 reasons an operator may give when revoking one certificate, by the
/// names the RFC uses (`certificateHold` and `removeFromCRL` are not offered: a
/// revocation here is final).
pub const CRL_REASONS: [&str; 8] = [
    "unspecified",
    "keyCompromise",
    "cACompromise",
    "affiliationChanged",
    "superseded",
    "cessationOfOperation",
    "privilegeWithdrawn",
    "aACompromise",
];

/// The CRL reason code for an RFC 5280 reason name; `None` for unspecified or unknown
/// (RFC 5280 5.3.1: unspecified should not be written).
fn crl_reason(name: &str) -> Option<rcgen::RevocationReason> {
    use rcgen::RevocationReason as R;
    Some(match name {
        "keyCompromise" => R::KeyCompromise,
        "cACompromise" => R::CaCompromise,
        "affiliationChanged" => R::AffiliationChanged,
        "superseded" => R::Superseded,
        "cessationOfOperation" => R::CessationOfOperation,
        "privilegeWithdrawn" => R::PrivilegeWithdrawn,
        "aACompromise" => R::AaCompromise,
        _ => return None,
    })
}

fn create_private_dir(dir: &Path) -> Result<(), CaError> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(io("cannot create", dir))
}

fn check_private(path: &Path) -> Result<(), CaError> {
    use std::os::unix::fs::PermissionsExt;
    let meta = fs::metadata(path).map_err(io("cannot stat", path))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(CaError::Invalid {
            path: path.to_path_buf(),
            reason: format!(
                "key file has mode {mode:o}; it must not be readable by group or others (chmod 600)"
            ),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests;
