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
    about = "Device agent: enroll, renew and inspect this device's identity"
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
