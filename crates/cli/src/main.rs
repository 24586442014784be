//! `portcullis`: args -> config -> tracing -> wire services.

mod audit;
mod config;
mod firmware;
mod instance;
mod logfmt;
mod manage;
mod node;
mod serve;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use crate::config::Config;

/// mimalloc: the proxy path allocates per request (headers, bodies, futures); glibc's
/// malloc spent ~8% of the gateway's CPU under load, mimalloc a fraction of that.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use crate::instance::Instance;

#[derive(Parser)]
#[command(name = "portcullis", version, about = "Identity, gateway and policy for IoT fleets")]
struct Cli {
    /// Configuration file (TOML); every key has a default, so none is needed.
    #[arg(long, global = true, env = "PORTCULLIS_CONFIG")]
    config: Option<PathBuf>,
    /// Data directory: CA, registry, admin token [default: ./portcullis-data].
    #[arg(long, global = true, env = "PORTCULLIS_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value = "plain")]
    log_format: LogFormat,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Plain,
    Json,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create the data dir: root and issuing CA, registry, admin token.
    Init {
        /// SPIFFE trust domain of device identities [default: portcullis.local].
        #[arg(long)]
        trust_domain: Option<String>,
    },
    /// Run Portcullis: the device port and the admin API (initialises an empty data dir).
    Up {
        /// Device port address [default: 0.0.0.0:8443]; port 0 picks a free port.
        #[arg(long)]
        device_addr: Option<String>,
        /// Admin API address [default: 127.0.0.1:7080]; port 0 picks a free port.
        #[arg(long)]
        admin_addr: Option<String>,
        /// SPIFFE trust domain, used when the data dir is initialised.
        #[arg(long)]
        trust_domain: Option<String>,
        /// DNS port address, UDP and TCP [default: 127.0.0.1:5353]; port 0 picks a free port.
        #[arg(long)]
        dns_addr: Option<String>,
        /// DNS-over-TLS address [default: 127.0.0.1:8853]; port 0 picks a free port.
        #[arg(long)]
        dot_addr: Option<String>,
    },
    /// Register and manage devices.
    #[command(subcommand)]
    Device(DeviceCmd),
    /// The CA's public material.
    #[command(subcommand)]
    Ca(CaCmd),
    /// One certificate: show it, or revoke it alone (the device keeps its others).
    #[command(subcommand)]
    Cert(CertCmd),
    /// The gateway's routes on the device port.
    #[command(subcommand)]
    Gateway(GatewayCmd),
    /// The DNS query log.
    #[command(subcommand)]
    Dns(DnsCmd),
    /// Device profiles: what a kind of device may expose and reach.
    #[command(subcommand)]
    Profile(ProfileCmd),
    /// Audit your own devices: exposed ports, default credentials, plaintext, TLS and identity hygiene.
    #[command(subcommand)]
    Audit(AuditCmd),
    /// Signed firmware updates (TUF): publish, roll out in stages, watch the fleet.
    #[command(subcommand)]
    Firmware(firmware::FirmwareCmd),
    /// The read-only token for scraping `/metrics`: prints its file (mode 0600, for
    /// Prometheus' `bearer_token_file`); `--rotate` replaces it (the running server
    /// accepts the new one from the next scrape, the old one no longer).
    MetricsToken {
        /// Write a new token.
        #[arg(long)]
        rotate: bool,
    },
    /// The append-only event log.
    Events {
        /// Only this device's events.
        #[arg(long)]
        device: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum DeviceCmd {
    /// Register a device; prints its one-time enrollment token.
    Add {
        id: String,
        /// Group [default: default].
        #[arg(long)]
        group: Option<String>,
        /// Token lifetime, e.g. 30m, 24h, 7d [default: 24h].
        #[arg(long)]
        token_ttl: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// List devices.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Show a device and its certificates.
    Show {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Refuse a device everywhere until resumed.
    Suspend {
        id: String,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Lift a suspension.
    Resume { id: String },
    /// Refuse a device for good and put its certificates on the CRL.
    Revoke {
        id: String,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Set the source addresses (IPs or CIDRs) the device's DNS queries come from;
    /// without addresses, shows them; `--clear` removes them all.
    Addresses {
        id: String,
        addresses: Vec<String>,
        #[arg(long)]
        clear: bool,
    },
    /// Issue another one-time enrollment token (e.g. after the device lost its key).
    Token {
        id: String,
        /// Token lifetime [default: 24h].
        #[arg(long)]
        ttl: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Assign a profile to a device (or `--clear` it).
    Profile {
        id: String,
        profile: Option<String>,
        #[arg(long, conflicts_with = "profile")]
        clear: bool,
    },
}

#[derive(Subcommand)]
enum ProfileCmd {
    /// Create or replace a profile, from a TOML/JSON file or from flags.
    Set {
        name: String,
        /// TOML or JSON document (`tcp = [443]`, `udp`, `domains`, `tls_required`, `description`).
        #[arg(long)]
        file: Option<PathBuf>,
        /// Allowed listening TCP ports.
        #[arg(long, value_delimiter = ',')]
        tcp: Vec<u16>,
        /// Allowed listening UDP ports.
        #[arg(long, value_delimiter = ',')]
        udp: Vec<u16>,
        /// Allowed outbound domains (the DNS allowlist reads these).
        #[arg(long, value_delimiter = ',')]
        domains: Vec<String>,
        /// TCP ports whose service must speak TLS.
        #[arg(long, value_delimiter = ',')]
        tls_required: Vec<u16>,
        #[arg(long)]
        description: Option<String>,
    },
    /// Import an IETF MUD file (RFC 8520) as a profile.
    ImportMud {
        file: PathBuf,
        /// Profile name (default: from the MUD URL).
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Profiles and the devices that use them.
    List {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum AuditCmd {
    /// Probe inventory devices and report findings (only registered device addresses).
    Run(audit::RunFlags),
    /// A run's report [default: the latest finished run].
    Report {
        run: Option<String>,
        /// json, markdown or html.
        #[arg(long, default_value = "markdown")]
        format: String,
    },
    /// Past runs.
    Runs {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum DnsCmd {
    /// Recent queries, newest first: time, client, device, name, type, action, rule, rcode.
    Log {
        /// Only this device's queries.
        #[arg(long)]
        device: Option<String>,
        /// Only blocked queries.
        #[arg(long)]
        blocked: bool,
        /// Only since this time (RFC 3339) or this long ago (e.g. 1h, 7d).
        #[arg(long)]
        since: Option<String>,
        /// At most this many [default: 100].
        #[arg(long)]
        limit: Option<u32>,
        #[arg(long)]
        json: bool,
    },
    /// The policies (and what each does with names it does not list) and the lists.
    Policies {
        #[arg(long)]
        json: bool,
    },
    /// Re-read the configuration (DNS policies and lists, gateway routes); on error the
    /// previous ones keep serving.
    Reload,
    /// The most often blocked names per device.
    Top {
        #[arg(long)]
        device: Option<String>,
        #[arg(long)]
        since: Option<String>,
        #[arg(long)]
        limit: Option<u32>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum GatewayCmd {
    /// Show the routes with forwarded and rejected counts by reason.
    Routes {
        #[arg(long)]
        json: bool,
    },
    /// Re-read the configuration's routes; on error the previous routes keep serving.
    Reload,
}

#[derive(Subcommand)]
enum CertCmd {
    /// Show a certificate by serial (hex, as `device show` and the event log print it).
    Show {
        serial: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Print only the certificate, PEM.
        #[arg(long)]
        pem: bool,
    },
    /// Revoke one certificate (a stolen key, a device reset); listed on the CRL at once.
    Revoke {
        serial: String,
        /// RFC 5280 reason: keyCompromise, superseded, cessationOfOperation,
        /// affiliationChanged, privilegeWithdrawn, cACompromise, aACompromise, unspecified.
        #[arg(long)]
        reason: String,
        /// Free text kept with the revocation.
        #[arg(long)]
        note: Option<String>,
    },
}

#[derive(Subcommand)]
enum CaCmd {
    /// Print the root CA certificate (PEM): the trust anchor devices need.
    Cert,
    /// Print the issuing and root CA certificates (PEM).
    Chain,
    /// Print the current CRL (PEM).
    Crl,
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PORTCULLIS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder =
        tracing_subscriber::fmt().with_writer(std::io::stderr).with_ansi(ansi).with_env_filter(filter);
    match format {
        LogFormat::Plain => builder.fmt_fields(logfmt::escaped_fields()).init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let mut cfg = Config::load(cli.config.as_deref())?;
    if let Some(d) = &cli.data_dir {
        cfg.data_dir = d.clone();
    }
    match cli.cmd {
        Cmd::Init { trust_domain } => {
            if let Some(td) = trust_domain {
                cfg.trust_domain =
                    td.parse().map_err(anyhow::Error::new).map_err(|e| e.context("--trust-domain"))?;
            }
            Instance::new(&cfg.data_dir).init(cfg.trust_domain.clone())?;
            println!("initialised {} (trust domain {})", cfg.data_dir.display(), cfg.trust_domain);
            Ok(())
        }
        Cmd::Up { device_addr, admin_addr, trust_domain, dns_addr, dot_addr } => {
            if let (Some(a), Some(dns)) = (dns_addr, cfg.dns.as_mut()) {
                dns.addr = a.parse().map_err(|_| anyhow::anyhow!("--dns-addr: {a:?} is not an address"))?;
                dns.default_addrs = false;
            }
            if let (Some(a), Some(dns)) = (dot_addr, cfg.dns.as_mut()) {
                dns.default_addrs = false;
                dns.dot_addr =
                    Some(a.parse().map_err(|_| anyhow::anyhow!("--dot-addr: {a:?} is not an address"))?);
            }
            if let Some(a) = device_addr {
                cfg.device_addr =
                    a.parse().map_err(|_| anyhow::anyhow!("--device-addr: {a:?} is not an address"))?;
            }
            if let Some(a) = admin_addr {
                cfg.admin_addr =
                    a.parse().map_err(|_| anyhow::anyhow!("--admin-addr: {a:?} is not an address"))?;
            }
            if let Some(td) = trust_domain {
                cfg.trust_domain =
                    td.parse().map_err(anyhow::Error::new).map_err(|e| e.context("--trust-domain"))?;
            }
            serve::up(cfg, cli.config).await
        }
        Cmd::Device(cmd) => {
            let c = manage::client(&cfg).await?;
            match cmd {
                DeviceCmd::Add { id, group, token_ttl, json } => {
                    manage::device_add(&c, &id, group.as_deref(), token_ttl.as_deref(), json).await
                }
                DeviceCmd::List { json } => manage::device_list(&c, json).await,
                DeviceCmd::Show { id, json } => manage::device_show(&c, &id, json).await,
                DeviceCmd::Suspend { id, reason } => {
                    manage::device_state(&c, &id, "suspend", reason.as_deref()).await
                }
                DeviceCmd::Resume { id } => manage::device_state(&c, &id, "resume", None).await,
                DeviceCmd::Addresses { id, addresses, clear } => {
                    manage::device_addresses(&c, &id, addresses, clear).await
                }
                DeviceCmd::Revoke { id, reason } => {
                    manage::device_state(&c, &id, "revoke", reason.as_deref()).await
                }
                DeviceCmd::Token { id, ttl, json } => {
                    manage::device_token(&c, &id, ttl.as_deref(), json).await
                }
                DeviceCmd::Profile { id, profile, clear } => {
                    if profile.is_none() && !clear {
                        anyhow::bail!("name a profile, or pass --clear");
                    }
                    audit::device_profile(&c, &id, profile.as_deref()).await
                }
            }
        }
        Cmd::Profile(cmd) => {
            let c = manage::client(&cfg).await?;
            match cmd {
                ProfileCmd::Set { name, file, tcp, udp, domains, tls_required, description } => {
                    let f = audit::ProfileFlags { file, tcp, udp, domains, tls_required, description };
                    audit::profile_set(&c, &name, f).await
                }
                ProfileCmd::ImportMud { file, name, json } => {
                    audit::profile_import_mud(&c, &file, name.as_deref(), json).await
                }
                ProfileCmd::List { json } => audit::profile_list(&c, json).await,
            }
        }
        Cmd::Firmware(cmd) => {
            use firmware::FirmwareCmd as F;
            if matches!(cmd, F::SignTargets { .. }) {
                firmware::sign_offline(cmd)
            } else if matches!(cmd, F::Keys(_) | F::Publish { keys: Some(_), .. }) {
                let inst = instance::Instance::new(&cfg.data_dir);
                let _lock = anyhow::Context::context(
                    inst.lock(),
                    "the server is running: stop it for key operations (they write the repository directly)",
                )?;
                firmware::local(&cfg.data_dir, cmd)
            } else {
                let c = manage::client(&cfg).await?;
                firmware::run(&c, cmd).await
            }
        }
        Cmd::Audit(cmd) => {
            let c = manage::client(&cfg).await?;
            match cmd {
                AuditCmd::Run(f) => audit::run(&c, f).await,
                AuditCmd::Report { run, format } => audit::report(&c, run.as_deref(), &format).await,
                AuditCmd::Runs { json } => audit::runs(&c, json).await,
            }
        }
        Cmd::Ca(cmd) => {
            let c = manage::client(&cfg).await?;
            match cmd {
                CaCmd::Cert => manage::pem(&c, "/v1/ca/root").await,
                CaCmd::Chain => manage::pem(&c, "/v1/ca/chain").await,
                CaCmd::Crl => manage::pem(&c, "/v1/ca/crl").await,
            }
        }
        Cmd::Cert(cmd) => {
            let c = manage::client(&cfg).await?;
            match cmd {
                CertCmd::Show { serial, json, pem } => manage::cert_show(&c, &serial, json, pem).await,
                CertCmd::Revoke { serial, reason, note } => {
                    manage::cert_revoke(&c, &serial, &reason, note.as_deref()).await
                }
            }
        }
        Cmd::Dns(cmd) => {
            let c = manage::client(&cfg).await?;
            match cmd {
                DnsCmd::Log { device, blocked, since, limit, json } => {
                    manage::dns_log(&c, device.as_deref(), blocked, since.as_deref(), limit, json).await
                }
                DnsCmd::Policies { json } => manage::dns_policies(&c, json).await,
                DnsCmd::Reload => manage::gateway_reload(&c, cli.config.as_deref()).await,
                DnsCmd::Top { device, since, limit, json } => {
                    manage::dns_top(&c, device.as_deref(), since.as_deref(), limit, json).await
                }
            }
        }
        Cmd::Gateway(cmd) => {
            let c = manage::client(&cfg).await?;
            match cmd {
                GatewayCmd::Routes { json } => manage::gateway_routes(&c, json).await,
                GatewayCmd::Reload => manage::gateway_reload(&c, cli.config.as_deref()).await,
            }
        }
        Cmd::MetricsToken { rotate } => {
            let inst = instance::Instance::new(&cfg.data_dir);
            if !inst.is_initialised() {
                anyhow::bail!(
                    "no Portcullis instance in {}; run `portcullis init` or `portcullis up` (or pass --data-dir)",
                    cfg.data_dir.display()
                );
            }
            let path = inst.ensure_metrics_token(rotate)?;
            println!("{}", path.display());
            if rotate {
                eprintln!("portcullis: new scrape token written; the previous one is refused from now on");
            }
            Ok(())
        }
        Cmd::Events { device, json } => {
            let c = manage::client(&cfg).await?;
            manage::events(&c, device.as_deref(), json).await
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Management commands are quiet unless asked; the server logs at info.
    if matches!(cli.cmd, Cmd::Up { .. }) || std::env::var_os("PORTCULLIS_LOG").is_some() {
        init_tracing(cli.log_format);
    }
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("portcullis: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("portcullis: {e:#}");
            ExitCode::FAILURE
        }
    }
}
