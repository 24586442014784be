//! The device side of Portcullis.
//!
//! [`enroll`] generates a P-256 key on the device (it never leaves; the file is mode
//! 0600), sends a CSR over EST with the one-time token, and stores the certificate;
//! [`renew`] re-enrolls over mTLS with a fresh key when less than a third of the
//! lifetime is left; [`status`] reads what is stored. The library is also what tests and
//! benchmarks use to simulate fleets.
//!
//! State lives in one directory: `key.pem`, `cert.pem` (leaf), `chain.pem` (leaf and
//! issuing CA, what the device presents), `ca.pem` (the root it trusts) and `agent.json`.

mod dir;
mod est;
pub mod firmware;

pub use dir::{AgentDir, Status};
pub use est::{Connection, EstClient, EstError};
pub use portcullis_client::updater::{Outcome, Refusal, UpdateError, UpdateOptions, UpdaterDir};

use std::path::Path;

use portcullis_core::{DeviceId, Token};

/// Agent failures.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Talking to the server failed.
    #[error(transparent)]
    Est(#[from] EstError),
    /// Local state is missing or unusable.
    #[error("{0}")]
    State(String),
    /// A file could not be read or written.
    #[error("{action} {path}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Key or CSR generation failed.
    #[error("key generation failed: {0}")]
    Key(String),
}

/// What `renew` did.
#[derive(Debug)]
pub enum Renewal {
    /// A new certificate was stored.
    Renewed(Status),
    /// Not due yet; nothing was sent.
    NotDue(Status),
}

fn new_key_and_csr(id: &DeviceId) -> Result<(rcgen::KeyPair, Vec<u8>), Error> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| Error::Key(e.to_string()))?;
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name.push(rcgen::DnType::CommonName, id.as_str());
    let csr = params.serialize_request(&key).map_err(|e| Error::Key(e.to_string()))?;
    Ok((key, csr.der().to_vec()))
}

/// Enrolls `id` with `token` at `server` (an `https://host:port` URL), trusting the root
/// CA in `ca_pem`, and stores the identity in `dir`.
pub async fn enroll(
    server: &str,
    ca_pem: &[u8],
    id: &DeviceId,
    token: &Token,
    dir: &Path,
) -> Result<Status, Error> {
    let client = EstClient::new(server, ca_pem, None)?;
    let (key, csr) = new_key_and_csr(id)?;
    let agent_dir = AgentDir::create(dir)?;
    agent_dir.stage_key(&key.serialize_pem())?;
    let (issuing, leaf) = client.enroll(id, token, &csr).await?;
    agent_dir.commit(
        server,
        id,
        ca_pem,
        &leaf,
        &issuing,
        &rcgen::PublicKeyData::subject_public_key_info(&key),
    )?;
    agent_dir.status()
}

/// Renews the certificate in `dir` if less than a third of its lifetime is left (or
/// always, with `force`), with a fresh key, over mTLS with the current certificate.
pub async fn renew(dir: &Path, force: bool) -> Result<Renewal, Error> {
    let agent_dir = AgentDir::open_for_update(dir)?;
    let status = agent_dir.status()?;
    if !force && !status.renewal_due {
        return Ok(Renewal::NotDue(status));
    }
    let (chain_pem, key_pem) = agent_dir.identity_pem()?;
    let ca_pem = agent_dir.ca_pem()?;
    let client = EstClient::new(&status.server, &ca_pem, Some((chain_pem, key_pem)))?;
    let (key, csr) = new_key_and_csr(&status.device)?;
    agent_dir.stage_key(&key.serialize_pem())?;
    let (issuing, leaf) = client.reenroll(&csr).await?;
    agent_dir.commit(
        &status.server,
        &status.device,
        &ca_pem,
        &leaf,
        &issuing,
        &rcgen::PublicKeyData::subject_public_key_info(&key),
    )?;
    Ok(Renewal::Renewed(agent_dir.status()?))
}

/// Keeps the identity in `dir` fresh until `stop` resolves: renews when a third of the
/// lifetime is left, checks at least every `check_every`, retries failures with
/// backoff (capped at `check_every`). Reports each outcome through `on_event`.
pub async fn run(
    dir: &Path,
    check_every: std::time::Duration,
    mut on_event: impl FnMut(&Result<Renewal, Error>),
    stop: impl std::future::Future<Output = ()>,
) -> Result<(), Error> {
    use std::time::Duration;
    tokio::pin!(stop);
    let mut backoff = Duration::from_secs(1);
    loop {
        let outcome = renew(dir, false).await;
        on_event(&outcome);
        let wait = match &outcome {
            Ok(Renewal::Renewed(s) | Renewal::NotDue(s)) => {
                backoff = Duration::from_secs(1);
                let until = s.renew_at - time::OffsetDateTime::now_utc();
                Duration::try_from(until).unwrap_or(Duration::ZERO).clamp(Duration::from_secs(1), check_every)
            }
            // Local state is broken: nothing a retry can fix.
            Err(e @ (Error::State(_) | Error::Io { .. })) => return Err(Error::State(e.to_string())),
            Err(_) => {
                backoff = (backoff * 2).min(check_every);
                backoff
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = &mut stop => return Ok(()),
        }
    }
}

/// What is stored in `dir`.
pub fn status(dir: &Path) -> Result<Status, Error> {
    AgentDir::open(dir)?.status()
}
