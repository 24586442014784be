//! One Portcullis instance = one data dir: CA, registry, admin token, TLS identity.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use portcullis_core::{Token, TrustDomain};
use portcullis_pki::{Authority, Ca, IssuancePolicy, write_private, write_public};
use portcullis_store::SqliteStore;

pub struct Instance {
    pub dir: PathBuf,
}

impl Instance {
    pub fn new(dir: &Path) -> Self {
        Self { dir: dir.to_path_buf() }
    }

    pub fn ca_dir(&self) -> PathBuf {
        self.dir.join("ca")
    }

    pub fn db_path(&self) -> PathBuf {
        self.dir.join("registry.sqlite")
    }

    pub fn token_path(&self) -> PathBuf {
        self.dir.join("admin.token")
    }

    /// The read-only scrape token for `/metrics` (what Prometheus' `bearer_token_file`
    /// points at).
    pub fn metrics_token_path(&self) -> PathBuf {
        self.dir.join("metrics.token")
    }

    /// Creates the scrape token (mode 0600) if there is none, or replaces it when
    /// `rotate`; a running server accepts the new one from its next scrape.
    pub fn ensure_metrics_token(&self, rotate: bool) -> anyhow::Result<PathBuf> {
        let path = self.metrics_token_path();
        if rotate || !path.exists() {
            let t = Token::generate("pcm");
            write_private(&path, format!("{}\n", t.expose()).as_bytes())
                .with_context(|| format!("cannot write {}", path.display()))?;
        }
        Ok(path)
    }

    pub fn admin_addr_path(&self) -> PathBuf {
        self.dir.join("admin.addr")
    }

    pub fn is_initialised(&self) -> bool {
        Ca::exists(&self.ca_dir())
    }

    /// Creates the CA, the registry and the admin token. Refuses an existing CA.
    pub fn init(&self, trust_domain: TrustDomain) -> anyhow::Result<()> {
        if self.is_initialised() {
            anyhow::bail!(
                "{} already holds a CA; refusing to overwrite it (remove the directory to start over)",
                self.dir.display()
            );
        }
        {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&self.dir)
                .with_context(|| format!("cannot create {}", self.dir.display()))?;
        }
        Ca::init(&self.ca_dir(), trust_domain).context("cannot create the CA")?;
        SqliteStore::open(self.db_path()).context("cannot create the registry")?;
        self.admin_token()?;
        Ok(())
    }

    /// The admin token, created (mode 0600) on first use.
    pub fn admin_token(&self) -> anyhow::Result<Token> {
        let path = self.token_path();
        match std::fs::read_to_string(&path) {
            Ok(t) => Ok(Token::from_presented(t.trim())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let t = Token::generate("pca");
                write_private(&path, format!("{}\n", t.expose()).as_bytes())
                    .with_context(|| format!("cannot write {}", path.display()))?;
                Ok(t)
            }
            Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
        }
    }

    pub async fn authority(&self, policy: IssuancePolicy) -> anyhow::Result<Arc<Authority>> {
        if !self.is_initialised() {
            anyhow::bail!(
                "no Portcullis instance in {}; run `portcullis init` or `portcullis up`",
                self.dir.display()
            );
        }
        let ca = Ca::load(&self.ca_dir()).context("cannot load the CA")?;
        let store = SqliteStore::open(self.db_path()).context("cannot open the registry")?;
        let a = Authority::new(ca, Arc::new(store), policy).await.context("cannot start the CA")?;
        Ok(Arc::new(a))
    }

    /// Takes the instance's exclusive lock: one server (or one offline CLI command) per
    /// data dir at a time. Held until the returned file is dropped.
    pub fn lock(&self) -> anyhow::Result<std::fs::File> {
        let path = self.dir.join("portcullis.lock");
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        match f.try_lock() {
            Ok(()) => Ok(f),
            Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!(
                "another portcullis process is using {} (a running server whose admin API is unreachable?)",
                self.dir.display()
            ),
            Err(std::fs::TryLockError::Error(e)) => {
                Err(e).with_context(|| format!("cannot lock {}", path.display()))
            }
        }
    }

    pub fn write_admin_addr(&self, addr: std::net::SocketAddr) -> anyhow::Result<()> {
        write_public(&self.admin_addr_path(), format!("{addr}\n").as_bytes())
            .with_context(|| format!("cannot write {}", self.admin_addr_path().display()))
    }

    pub fn admin_addr(&self) -> Option<std::net::SocketAddr> {
        std::fs::read_to_string(self.admin_addr_path()).ok()?.trim().parse().ok()
    }
}
