//! The one assembly of a Portcullis node over a data dir, used by `portcullis up` and by
//! the management commands when no server runs (they serve the same admin API
//! in-process): the registry's authority, the firmware repository and the auditor.
//! `up` adds the listeners and the services' background tasks on top.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use portcullis_admin::{AdminToken, Running};
use portcullis_firmware::service::Firmware;
use portcullis_pki::{Authority, ClientCertVerifier, tls};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::Config;
use crate::instance::Instance;

/// Whether opening a data dir may create it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Open {
    /// `portcullis up`: initialise an empty data dir.
    CreateIfMissing,
    /// Management commands: an empty data dir is an error.
    Existing,
}

/// A data dir opened for one process (it holds the instance lock).
pub struct Node {
    pub inst: Instance,
    pub lock: std::fs::File,
    pub authority: Arc<Authority>,
    pub firmware: Arc<Firmware>,
    pub auditor: Arc<portcullis_audit::Auditor>,
}

impl Node {
    pub async fn open(cfg: &Config, open: Open) -> anyhow::Result<Self> {
        let inst = Instance::new(&cfg.data_dir);
        if !inst.is_initialised() {
            if open == Open::Existing {
                anyhow::bail!(
                    "no Portcullis instance in {}; run `portcullis init` or `portcullis up` (or pass --data-dir)",
                    cfg.data_dir.display()
                );
            }
            inst.init(cfg.trust_domain.clone())?;
            eprintln!(
                "portcullis: initialised {} (trust domain {})",
                cfg.data_dir.display(),
                cfg.trust_domain
            );
        }
        let lock = inst.lock()?;
        let authority = inst.authority(cfg.policy.clone()).await?;
        let firmware =
            Firmware::open(&cfg.data_dir, authority.store().clone()).context("firmware repository")?;
        let auditor = crate::audit::auditor(authority.store().clone(), &cfg.data_dir, &firmware);
        Ok(Self { inst, lock, authority, firmware, auditor })
    }

    /// The admin API over this node; `running` when it serves inside `portcullis up`.
    pub fn admin(&self, token: AdminToken, operator: &str, running: Option<Running>) -> axum::Router {
        portcullis_admin::router(
            self.authority.clone(),
            token,
            operator,
            running,
            self.auditor.clone(),
            self.firmware.clone(),
        )
    }

    /// Issues a fresh device-port certificate (it always carries the configured names),
    /// writes it under `tls/`, and builds the device port's TLS configuration.
    pub fn device_tls(&self, cfg: &Config) -> anyhow::Result<DeviceTls> {
        let server = self
            .authority
            .ca()
            .issue_server(&cfg.server_names, cfg.server_cert_lifetime)
            .context("cannot issue the device-port certificate")?;
        let dir = cfg.data_dir.join("tls");
        std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        portcullis_pki::write_public(&dir.join("server.crt"), server.chain_pem.as_bytes())?;
        portcullis_pki::write_private(&dir.join("server.key"), server.key_pem.as_bytes())?;
        let chain = CertificateDer::pem_slice_iter(server.chain_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .context("server chain")?;
        let key = PrivateKeyDer::from_pem_slice(server.key_pem.as_bytes()).context("server key")?;
        let verifier = ClientCertVerifier::new(self.authority.ca()).context("client verifier")?;
        let config = tls::server_config(&verifier, chain, key).context("TLS configuration")?;
        Ok(DeviceTls { config, verifier })
    }
}

/// The device port's TLS configuration and its verifier of device certificates.
pub struct DeviceTls {
    pub config: Arc<rustls::ServerConfig>,
    pub verifier: ClientCertVerifier,
}

/// `portcullis up`'s reload (SIGHUP, `POST /v1/gateway/reload`): re-reads the file the
/// server started with and hands each service its part; nothing changes unless every
/// part is valid.
pub struct ConfigReload {
    pub path: Option<PathBuf>,
    pub gateway: Arc<portcullis_gateway::Gateway>,
    pub dns: Option<Arc<portcullis_dns::Dns>>,
}

impl portcullis_admin::Reload for ConfigReload {
    fn reload(&self) -> Result<usize, Box<dyn std::error::Error + Send + Sync>> {
        let fresh = Config::load(self.path.as_deref()).map_err(|e| format!("{e:#}"))?;
        let table = portcullis_gateway::RouteTable::try_new(fresh.routes)?;
        if let (Some(dns), Some(d)) = (&self.dns, &fresh.dns) {
            dns.reload(d)?;
        }
        let n = table.len();
        self.gateway.replace(table);
        tracing::info!(routes = n, "gateway routes reloaded");
        Ok(n)
    }
}
