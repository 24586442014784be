//! `portcullis-agent`: the device side of Portcullis.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use portcullis_agent::Renewal;
use portcullis_core::{DeviceId, Token};

#[derive(Parser)]
#[command(
    name = "portcullis-agent",
    version,
    about = "Device agent: enroll, renew and inspect this device's identity; verified firmware updates"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Generate a key on this device and enroll it over EST with a one-time token.
    Enroll {
        /// Device port URL, e.g. https://portcullis.example:8443
        #[arg(long)]
        server: String,
        /// Root CA certificate to trust (PEM), from `portcullis ca cert`.
        #[arg(long)]
        ca: PathBuf,
        /// This device's id.
        #[arg(long)]
        id: String,
        /// The one-time enrollment token (or set PORTCULLIS_ENROLL_TOKEN).
        #[arg(long, env = "PORTCULLIS_ENROLL_TOKEN", hide_env_values = true)]
        token: String,
        /// Directory that will hold the key and certificates.
        #[arg(long)]
        dir: PathBuf,
    },
    /// Re-enroll over mTLS when less than a third of the certificate's lifetime is left.
    Renew {
        /// The agent's directory.
        #[arg(long)]
        dir: PathBuf,
        /// Renew now, whatever the remaining lifetime.
        #[arg(long)]
        force: bool,
    },
    /// Stay running and renew whenever a third of the lifetime is left (a service).
    Run {
        /// The agent's directory.
        #[arg(long)]
        dir: PathBuf,
        /// Check at least this often, e.g. 30m, 1h.
        #[arg(long, default_value = "1h")]
        check_every: String,
    },
    /// Check for, download, verify and install the firmware the server directs (TUF).
    Update {
        /// The agent's directory.
        #[arg(long)]
        dir: PathBuf,
        /// Hardware model (stored on first use; later runs must match).
        #[arg(long)]
        hardware: Option<String>,
        /// The factory firmware version in slot A (first use only).
        #[arg(long, default_value = "0.0.0")]
        installed_version: String,
        /// The repository's root.json, the trust anchor (first use; `portcullis firmware root`).
        #[arg(long)]
        root: Option<PathBuf>,
        /// Only say what would be installed.
        #[arg(long)]
        check: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// The pending image started well: make its slot active and raise the anti-rollback floor.
    Confirm {
        /// The agent's directory.
        #[arg(long)]
        dir: PathBuf,
    },
    /// The pending image failed its health check: stay on the running slot, report why.
    Rollback {
        /// The agent's directory.
        #[arg(long)]
        dir: PathBuf,
        /// Why (reported to the server).
        #[arg(long, default_value = "health check failed")]
        reason: String,
    },
    /// At start-up: if an update is pending, run the health check — success confirms it,
    /// failure (or a timeout) rolls back to the previous slot and reports why.
    Boot {
        /// The agent's directory.
        #[arg(long)]
        dir: PathBuf,
        /// Command whose exit status decides, run with `sh -c`.
        #[arg(long)]
        health_check: String,
        /// Give up on the check after this long, e.g. 60s, 5m.
        #[arg(long, default_value = "60s")]
        timeout: String,
    },
    /// Show the firmware slots and anti-rollback floor.
    FirmwareStatus {
        /// The agent's directory.
        #[arg(long)]
        dir: PathBuf,
    },
    /// Show the stored identity.
    Status {
        /// The agent's directory.
        #[arg(long)]
        dir: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

fn print_status(s: &portcullis_agent::Status, json: bool) {
    if json {
        println!("{}", serde_json::to_string_pretty(s).unwrap_or_default());
        return;
    }
    let fmt = |t: time::OffsetDateTime| {
        t.format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
    };
    println!("device:       {}", s.device);
    println!("server:       {}", s.server);
    println!("serial:       {}", s.serial);
    println!("fingerprint:  {}", s.fingerprint);
    println!("valid:        {} .. {}", fmt(s.not_before), fmt(s.not_after));
    println!("remaining:    {}h", s.remaining_secs / 3600);
    println!("renewal due:  {} (at {})", if s.renewal_due { "yes" } else { "no" }, fmt(s.renew_at));
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.cmd {
        Cmd::Enroll { server, ca, id, token, dir } => {
            let id = DeviceId::try_new(id).context("--id")?;
            let ca_pem = std::fs::read(&ca).with_context(|| format!("cannot read {}", ca.display()))?;
            let status = portcullis_agent::enroll(&server, &ca_pem, &id, &Token::from_presented(token), &dir)
                .await
                .context("enrollment failed")?;
            println!("enrolled {} (serial {}), identity in {}", status.device, status.serial, dir.display());
        }
        Cmd::Renew { dir, force } => {
            match portcullis_agent::renew(&dir, force).await.context("renewal failed")? {
                Renewal::Renewed(s) => {
                    println!("renewed {} (serial {}, valid until {})", s.device, s.serial, s.not_after)
                }
                Renewal::NotDue(s) => {
                    println!(
                        "not due: {}h of validity left (renews with a third left; --force to renew now)",
                        s.remaining_secs / 3600
                    )
                }
            }
        }
        Cmd::Status { dir, json } => print_status(&portcullis_agent::status(&dir)?, json),
        Cmd::Update { dir, hardware, installed_version, root, check, json } => {
            let up = portcullis_agent::UpdaterDir::new(&dir);
            let root = match &root {
                Some(p) => Some(std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))?),
                None => None,
            };
            match hardware {
                Some(hw) => {
                    up.init(&hw, &installed_version, root.as_deref())?;
                }
                None => {
                    up.load().context("first update: pass --hardware (and --root, --installed-version)")?;
                }
            }
            let transport = portcullis_agent::firmware::MtlsTransport::open(&dir)?;
            let outcome = up
                .update(&transport, portcullis_agent::UpdateOptions { check, ..Default::default() })
                .await
                .context("update failed")?;
            if json {
                println!("{}", serde_json::to_string_pretty(&outcome).unwrap_or_default());
            } else {
                match outcome {
                    portcullis_agent::Outcome::UpToDate { installed } => {
                        println!("up to date: running {installed}")
                    }
                    portcullis_agent::Outcome::Available { target, version, length } => {
                        println!(
                            "available: {version} ({target}, {length} bytes); run without --check to install"
                        )
                    }
                    portcullis_agent::Outcome::Installed { target, version, slot, fetched } => println!(
                        "installed {version} ({target}) into slot {slot} after verifying it ({fetched} bytes fetched); \
                         pending: confirm after a good start (`portcullis-agent confirm`)"
                    ),
                }
            }
        }
        Cmd::Confirm { dir } => {
            let transport = portcullis_agent::firmware::MtlsTransport::open(&dir)?;
            let s = portcullis_agent::UpdaterDir::new(&dir).confirm(&transport).await?;
            println!("confirmed: running {} from slot {}", s.installed(), s.active);
        }
        Cmd::Rollback { dir, reason } => {
            let transport = portcullis_agent::firmware::MtlsTransport::open(&dir)?;
            let s = portcullis_agent::UpdaterDir::new(&dir).rollback(&transport, &reason).await?;
            println!("rolled back: running {} from slot {}", s.installed(), s.active);
        }
        Cmd::Boot { dir, health_check, timeout } => {
            let up = portcullis_agent::UpdaterDir::new(&dir);
            let state = up.load()?;
            let Some(pending) = state.pending.clone() else {
                println!("nothing pending: running {} from slot {}", state.installed(), state.active);
                return Ok(());
            };
            let limit =
                portcullis_core::parse_duration(&timeout).map_err(anyhow::Error::msg).context("--timeout")?;
            let run =
                tokio::process::Command::new("sh").arg("-c").arg(&health_check).kill_on_drop(true).status();
            let verdict = match tokio::time::timeout(limit, run).await {
                Ok(Ok(s)) if s.success() => Ok(()),
                Ok(Ok(s)) => Err(format!("health check `{health_check}` failed ({s})")),
                Ok(Err(e)) => Err(format!("health check `{health_check}` could not run: {e}")),
                Err(_) => Err(format!("health check `{health_check}` timed out after {timeout}")),
            };
            let transport = portcullis_agent::firmware::MtlsTransport::open(&dir)?;
            match verdict {
                Ok(()) => {
                    let s = up.confirm(&transport).await?;
                    println!("health check passed: confirmed {} in slot {}", pending.version, s.active);
                }
                Err(why) => {
                    let s = up.rollback(&transport, &why).await?;
                    println!("rolled back: {why}; running {} from slot {}", s.installed(), s.active);
                }
            }
        }
        Cmd::FirmwareStatus { dir } => {
            let s = portcullis_agent::UpdaterDir::new(&dir).load()?;
            println!("{}", serde_json::to_string_pretty(&s).unwrap_or_default());
        }
        Cmd::Run { dir, check_every } => {
            let every = portcullis_core::parse_duration(&check_every)
                .map_err(anyhow::Error::msg)
                .context("--check-every")?;
            let report = |r: &Result<Renewal, portcullis_agent::Error>| match r {
                Ok(Renewal::Renewed(s)) => {
                    println!("renewed {} (serial {}, valid until {})", s.device, s.serial, s.not_after)
                }
                Ok(Renewal::NotDue(s)) => tracing::debug!(renew_at = %s.renew_at, "not due"),
                Err(e) => eprintln!("portcullis-agent: renewal failed, will retry: {e:#}"),
            };
            portcullis_agent::run(&dir, every, report, shutdown_signal()).await?;
        }
    }
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
        (Ok(mut t), Ok(mut i)) => {
            tokio::select! {
                _ = t.recv() => {}
                _ = i.recv() => {}
            }
        }
        _ => std::future::pending::<()>().await,
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("portcullis-agent: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("portcullis-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}
