use std::fs;
use std::path::{Path, PathBuf};

use portcullis_client::{pem_encode, write_private, write_public};
use portcullis_core::{DeviceId, Fingerprint, Serial};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::Error;

const KEY: &str = "key.pem";
const STAGED_KEY: &str = "key.pem.staged";
const CERT: &str = "cert.pem";
const CHAIN: &str = "chain.pem";
const CA: &str = "ca.pem";
const META: &str = "agent.json";

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Meta {
    server: String,
    device: DeviceId,
}

/// The device's identity as stored in its directory.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// Device id.
    pub device: DeviceId,
    /// EST server URL.
    pub server: String,
    /// Certificate serial.
    pub serial: Serial,
    /// Certificate fingerprint.
    pub fingerprint: Fingerprint,
    /// Validity start.
    #[serde(with = "time::serde::rfc3339")]
    pub not_before: OffsetDateTime,
    /// Validity end.
    #[serde(with = "time::serde::rfc3339")]
    pub not_after: OffsetDateTime,
    /// Seconds of validity left (negative once expired).
    pub remaining_secs: i64,
    /// True when less than a third of the lifetime is left.
    pub renewal_due: bool,
    /// When a third of the lifetime will be left.
    #[serde(with = "time::serde::rfc3339")]
    pub renew_at: OffsetDateTime,
}

/// The agent's state directory.
#[derive(Debug)]
pub struct AgentDir {
    dir: PathBuf,
    /// Held by writers (enroll, renew): one key rotation at a time per directory.
    _lock: Option<fs::File>,
}

impl AgentDir {
    fn io(&self, action: &'static str, name: &str) -> impl FnOnce(std::io::Error) -> Error + use<> {
        let path = self.dir.join(name);
        move |source| Error::Io { action, path, source }
    }

    /// Creates (mode 0700) or opens `dir` for a new enrollment, locked for writing.
    pub fn create(dir: &Path) -> Result<Self, Error> {
        use std::os::unix::fs::DirBuilderExt;
        fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(|source| Error::Io {
            action: "cannot create",
            path: dir.to_path_buf(),
            source,
        })?;
        Ok(Self { dir: dir.to_path_buf(), _lock: Some(lock(dir)?) })
    }

    /// Opens an enrolled directory to read it. Changes nothing.
    pub fn open(dir: &Path) -> Result<Self, Error> {
        if !dir.join(META).exists() {
            return Err(Error::State(format!(
                "{} holds no enrolled identity; run `portcullis-agent enroll`",
                dir.display()
            )));
        }
        Ok(Self { dir: dir.to_path_buf(), _lock: None })
    }

    /// Opens an enrolled directory for a key rotation: takes the directory's lock and
    /// finishes a rotation a crash interrupted.
    pub fn open_for_update(dir: &Path) -> Result<Self, Error> {
        let mut d = Self::open(dir)?;
        d._lock = Some(lock(dir)?);
        d.recover()?;
        Ok(d)
    }

    /// If a staged key matches the stored certificate, the crash happened after the
    /// certificate was written: promote the key. Otherwise the staged key is stale.
    fn recover(&self) -> Result<(), Error> {
        let staged = self.dir.join(STAGED_KEY);
        if !staged.exists() {
            return Ok(());
        }
        let key_pem = fs::read_to_string(&staged).map_err(self.io("cannot read", STAGED_KEY))?;
        let matches =
            rcgen::KeyPair::from_pem(&key_pem).ok().zip(self.leaf_der().ok()).is_some_and(|(k, leaf)| {
                X509Certificate::from_der(&leaf).is_ok_and(|(_, c)| {
                    c.public_key().raw == rcgen::PublicKeyData::subject_public_key_info(&k).as_slice()
                })
            });
        if matches {
            fs::rename(&staged, self.dir.join(KEY)).map_err(self.io("cannot rename", STAGED_KEY))?;
        } else {
            fs::remove_file(&staged).map_err(self.io("cannot remove", STAGED_KEY))?;
        }
        Ok(())
    }

    /// Writes a new private key beside the current one (mode 0600) before it is used.
    pub fn stage_key(&self, key_pem: &str) -> Result<(), Error> {
        write_private(&self.dir.join(STAGED_KEY), key_pem.as_bytes())
            .map_err(self.io("cannot write", STAGED_KEY))
    }

    /// Stores a new certificate and promotes the staged key that belongs to it.
    pub fn commit(
        &self,
        server: &str,
        device: &DeviceId,
        ca_pem: &[u8],
        leaf: &[u8],
        issuing: &[u8],
        public_key: &[u8],
    ) -> Result<(), Error> {
        let (_, cert) = X509Certificate::from_der(leaf)
            .map_err(|e| Error::State(format!("server sent a bad certificate: {e}")))?;
        if cert.public_key().raw != public_key {
            return Err(Error::State("server returned a certificate for another key".into()));
        }
        let leaf_pem = pem_encode("CERTIFICATE", leaf);
        write_public(&self.dir.join(CA), ca_pem).map_err(self.io("cannot write", CA))?;
        let meta = serde_json::to_vec_pretty(&Meta { server: server.to_owned(), device: device.clone() })
            .unwrap_or_default();
        write_public(&self.dir.join(META), &meta).map_err(self.io("cannot write", META))?;
        write_public(
            &self.dir.join(CHAIN),
            format!("{leaf_pem}{}", pem_encode("CERTIFICATE", issuing)).as_bytes(),
        )
        .map_err(self.io("cannot write", CHAIN))?;
        write_public(&self.dir.join(CERT), leaf_pem.as_bytes()).map_err(self.io("cannot write", CERT))?;
        fs::rename(self.dir.join(STAGED_KEY), self.dir.join(KEY))
            .map_err(self.io("cannot rename", STAGED_KEY))?;
        Ok(())
    }

    fn leaf_der(&self) -> Result<Vec<u8>, Error> {
        let text = fs::read(self.dir.join(CERT)).map_err(self.io("cannot read", CERT))?;
        first_cert(&text)
            .ok_or_else(|| Error::State(format!("{} holds no certificate", self.dir.join(CERT).display())))
    }

    /// (chain PEM, key PEM) for mTLS. The key is returned only to build a TLS config.
    pub fn identity_pem(&self) -> Result<(Vec<u8>, Vec<u8>), Error> {
        let chain = fs::read(self.dir.join(CHAIN)).map_err(self.io("cannot read", CHAIN))?;
        let key = fs::read(self.dir.join(KEY)).map_err(self.io("cannot read", KEY))?;
        Ok((chain, key))
    }

    /// The trusted root, PEM.
    pub fn ca_pem(&self) -> Result<Vec<u8>, Error> {
        fs::read(self.dir.join(CA)).map_err(self.io("cannot read", CA))
    }

    /// The stored identity.
    pub fn status(&self) -> Result<Status, Error> {
        let meta: Meta =
            serde_json::from_slice(&fs::read(self.dir.join(META)).map_err(self.io("cannot read", META))?)
                .map_err(|e| Error::State(format!("{}: {e}", self.dir.join(META).display())))?;
        let der = self.leaf_der()?;
        let (_, cert) =
            X509Certificate::from_der(&der).map_err(|e| Error::State(format!("stored certificate: {e}")))?;
        let nb = cert.validity().not_before.timestamp();
        let na = cert.validity().not_after.timestamp();
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let remaining = na - now;
        Ok(Status {
            device: meta.device,
            server: meta.server,
            serial: Serial::from_bytes(cert.raw_serial()),
            fingerprint: Fingerprint::of(&der),
            not_before: OffsetDateTime::from_unix_timestamp(nb).unwrap_or(OffsetDateTime::UNIX_EPOCH),
            not_after: OffsetDateTime::from_unix_timestamp(na).unwrap_or(OffsetDateTime::UNIX_EPOCH),
            remaining_secs: remaining,
            renewal_due: remaining * 3 < (na - nb),
            renew_at: OffsetDateTime::from_unix_timestamp(na - (na - nb) / 3)
                .unwrap_or(OffsetDateTime::UNIX_EPOCH),
        })
    }
}

/// Waits for the directory's exclusive lock (another enroll/renew finishing first).
fn lock(dir: &Path) -> Result<fs::File, Error> {
    let path = dir.join("agent.lock");
    let f = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|source| Error::Io { action: "cannot open", path: path.clone(), source })?;
    f.lock().map_err(|source| Error::Io { action: "cannot lock", path, source })?;
    Ok(f)
}

/// The first certificate in a PEM file, DER.
pub(crate) fn first_cert(pem_bytes: &[u8]) -> Option<Vec<u8>> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem_bytes).next()?.ok().map(|c| c.to_vec())
}
