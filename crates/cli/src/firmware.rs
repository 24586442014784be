//! `portcullis firmware …`: publish signed images, print the trust anchor, watch the
//! fleet, stage rollouts, keep keys offline.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::Subcommand;
use portcullis_admin::AdminClient;
use portcullis_admin::wire;
use portcullis_firmware::repo::{Expiry, FirmwareRepo, KeyDir};
use serde_json::json;

#[derive(Subcommand)]
pub enum FirmwareCmd {
    /// Publish an image as a signed TUF target `HW/VERSION/NAME`.
    Publish {
        #[command(flatten)]
        image: ImageArgs,
        /// Sign targets with the offline key in DIR (the server must be stopped: this
        /// writes the data dir directly).
        #[arg(long, value_name = "DIR")]
        keys: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Print the current trusted root.json: the trust anchor devices are provisioned with.
    Root,
    /// Print the newest metadata of a role (root, targets, snapshot, timestamp).
    Metadata { role: String },
    /// Offline: sign the next targets metadata with the targets key in --keys, adding an
    /// image (needs no data dir and no server; carry the output and the image to one).
    SignTargets {
        #[command(flatten)]
        image: ImageArgs,
        /// Directory holding `targets.pk8`.
        #[arg(long, value_name = "DIR")]
        keys: PathBuf,
        /// The repository's current targets metadata (`portcullis firmware metadata targets`).
        #[arg(long)]
        current: PathBuf,
        /// Where the signed targets metadata goes.
        #[arg(long)]
        out: PathBuf,
    },
    /// Hand targets metadata signed offline to the server with the images it adds; the
    /// server checks it against its root and signs snapshot and timestamp.
    ImportTargets {
        /// The signed targets metadata (from sign-targets).
        signed: PathBuf,
        /// The images it adds.
        #[arg(long = "image", required = true)]
        images: Vec<PathBuf>,
    },
    /// Published images.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Devices per version, who is behind, failures, rollouts.
    Status {
        #[arg(long)]
        hardware: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Re-sign snapshot and timestamp now if less than half their lifetime is left.
    Refresh,
    /// Staged rollouts.
    #[command(subcommand)]
    Rollout(RolloutCmd),
    /// Key custody.
    #[command(subcommand)]
    Keys(KeysCmd),
}

/// An image to publish and what its signed metadata says about it.
#[derive(clap::Args)]
pub struct ImageArgs {
    /// The image file.
    file: PathBuf,
    /// Hardware model it is built for.
    #[arg(long)]
    hardware: String,
    /// Its semantic version, e.g. 1.4.2.
    #[arg(long)]
    version: String,
    /// Release notes, kept in the target's signed metadata.
    #[arg(long)]
    notes: Option<String>,
    /// Allow a version lower than the newest published for this hardware.
    #[arg(long)]
    allow_downgrade: bool,
}

impl ImageArgs {
    fn semver(&self) -> anyhow::Result<semver::Version> {
        self.version.parse().with_context(|| format!("invalid version {:?}", self.version))
    }
}

#[derive(Subcommand)]
pub enum RolloutCmd {
    /// Offer a published version in stages.
    Create {
        #[arg(long)]
        hardware: String,
        #[arg(long)]
        version: String,
        /// Only devices of this group.
        #[arg(long)]
        group: Option<String>,
        /// Stage percentages.
        #[arg(long, default_value = "5,25,100")]
        stages: String,
        /// Pause automatically above this failure rate of reporting devices.
        #[arg(long, default_value = "5%")]
        max_failure_rate: String,
        /// Reporting devices needed before the failure rate can pause the rollout.
        #[arg(long, default_value_t = 10)]
        min_reports: usize,
        #[arg(long)]
        json: bool,
    },
    /// Widen to the next stage.
    Advance { id: i64 },
    /// Stop admitting devices.
    Pause { id: i64 },
    /// Admit devices again.
    Resume { id: i64 },
    /// Stop for good.
    Abort { id: i64 },
    /// Progress of one rollout.
    Status {
        id: i64,
        #[arg(long)]
        json: bool,
    },
    /// Every rollout.
    List {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub enum KeysCmd {
    /// Create the repository with its root and targets keys in DIR (removable media),
    /// not in the data dir; the server keeps only the snapshot and timestamp keys.
    Init {
        /// Where the root and targets keys go (mode 0600).
        #[arg(long, value_name = "DIR")]
        offline: PathBuf,
    },
    /// Rotate the root key: root N+1 signed by the old and the new key.
    RotateRoot {
        /// Directory holding the current root key (`root.pk8`).
        #[arg(long, value_name = "DIR")]
        old: PathBuf,
        /// Directory for the new root key (created if it holds none).
        #[arg(long, value_name = "DIR")]
        new: PathBuf,
    },
}

fn print_target(t: &portcullis_firmware::TargetInfo) {
    println!("published {} ({} bytes, sha256 {})", t.path, t.length, t.sha256);
}

/// Runs the subcommands that go through the admin API.
pub async fn run(c: &AdminClient, cmd: FirmwareCmd) -> anyhow::Result<()> {
    match cmd {
        FirmwareCmd::Publish {
            image: ImageArgs { file, hardware, version, notes, allow_downgrade },
            keys: None,
            json,
        } => {
            let name = file
                .file_name()
                .and_then(|n| n.to_str())
                .with_context(|| format!("{}: not a file name", file.display()))?
                .to_owned();
            let bytes = std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
            let mut query = format!(
                "hardware={}&version={}&name={}",
                portcullis_admin::component(&hardware),
                portcullis_admin::component(&version),
                portcullis_admin::component(&name)
            );
            if let Some(n) = notes {
                query.push_str(&format!("&notes={}", portcullis_admin::component(&n)));
            }
            if allow_downgrade {
                query.push_str("&allow_downgrade=true");
            }
            let r = c.publish_firmware(&query, bytes.into()).await?;
            if json { crate::manage::print_json(&r) } else { print_target(&r.target) }
        }
        FirmwareCmd::Publish { keys: Some(_), .. } | FirmwareCmd::Keys(_) => {
            unreachable!("handled without the admin API")
        }
        FirmwareCmd::Root => {
            let root = c.get_text("/v1/firmware/root").await?;
            println!("{root}");
        }
        FirmwareCmd::Metadata { role } => {
            println!(
                "{}",
                c.get_text(&format!("/v1/firmware/metadata/{}", portcullis_admin::component(&role))).await?
            );
        }
        FirmwareCmd::SignTargets { .. } => unreachable!("handled without the admin API"),
        FirmwareCmd::ImportTargets { signed, images } => {
            for image in &images {
                let bytes =
                    std::fs::read(image).with_context(|| format!("cannot read {}", image.display()))?;
                let r = c.upload_firmware(bytes.into()).await?;
                println!("uploaded {} ({} bytes, sha256 {})", image.display(), r.length, r.sha256);
            }
            let doc = std::fs::read(&signed).with_context(|| format!("cannot read {}", signed.display()))?;
            for t in &c.import_firmware(doc.into()).await?.targets {
                print_target(t);
            }
        }
        FirmwareCmd::List { json } => {
            let r = c.firmware_targets().await?;
            if json {
                crate::manage::print_json(&r);
                return Ok(());
            }
            println!("{:<16} {:<12} {:>12}  {:<64}  PATH", "HARDWARE", "VERSION", "BYTES", "SHA256");
            for t in &r.targets {
                println!(
                    "{:<16} {:<12} {:>12}  {:<64}  {}",
                    t.hardware,
                    t.version.to_string(),
                    t.length,
                    t.sha256,
                    t.path
                );
            }
        }
        FirmwareCmd::Status { hardware, json } => {
            let r = c.firmware_status(hardware.as_deref()).await?;
            if json {
                crate::manage::print_json(&r);
                return Ok(());
            }
            for hw in &r.hardware {
                println!(
                    "hardware {} (newest published: {})",
                    hw.hardware,
                    hw.newest.as_deref().unwrap_or("none")
                );
                for (v, n) in &hw.versions {
                    println!("  {v:<12} {n} device(s)");
                }
                println!("  behind: {}   last report failed: {}", hw.behind.len(), hw.failed.len());
                for r in &hw.rollouts {
                    print_rollout(r);
                }
            }
        }
        FirmwareCmd::Refresh => {
            let r = c.refresh_firmware().await?;
            println!("re-signed: snapshot {}, timestamp {}", r.snapshot, r.timestamp);
        }
        FirmwareCmd::Rollout(cmd) => rollout(c, cmd).await?,
    }
    Ok(())
}

fn print_rollout(r: &wire::RolloutStatus) {
    println!(
        "  rollout {} {} {} -> {}: {} at stage {} ({}%): {} of {} admitted, {} confirmed, {} failed{}",
        r.id,
        r.hardware,
        r.group.as_deref().unwrap_or("(all groups)"),
        r.version,
        crate::manage::json_word(&r.state),
        r.stage,
        r.percent,
        r.admitted,
        r.population,
        r.confirmed,
        r.failed,
        r.reason.as_deref().map(|s| format!(" — {s}")).unwrap_or_default()
    );
}

async fn rollout(c: &AdminClient, cmd: RolloutCmd) -> anyhow::Result<()> {
    let (r, json) = match cmd {
        RolloutCmd::Create { hardware, version, group, stages, max_failure_rate, min_reports, json } => {
            let body = json!({
                "hardware": hardware, "version": version, "group": group,
                "stages": stages, "max_failure_rate": max_failure_rate, "min_reports": min_reports,
            });
            (c.create_rollout(&body).await?, json)
        }
        RolloutCmd::Advance { id } => (c.change_rollout(id, "advance").await?, false),
        RolloutCmd::Pause { id } => (c.change_rollout(id, "pause").await?, false),
        RolloutCmd::Resume { id } => (c.change_rollout(id, "resume").await?, false),
        RolloutCmd::Abort { id } => (c.change_rollout(id, "abort").await?, false),
        RolloutCmd::Status { id, json } => (c.rollout(id).await?, json),
        RolloutCmd::List { json } => {
            let r = c.rollouts().await?;
            if json {
                crate::manage::print_json(&r);
            } else {
                r.rollouts.iter().for_each(print_rollout);
            }
            return Ok(());
        }
    };
    if json {
        crate::manage::print_json(&r)
    } else {
        print_rollout(&r)
    }
    Ok(())
}

/// `firmware sign-targets`: needs only the key and the files.
pub fn sign_offline(cmd: FirmwareCmd) -> anyhow::Result<()> {
    let FirmwareCmd::SignTargets { image, keys, current, out } = cmd else {
        unreachable!("only sign-targets")
    };
    let v = image.semver()?;
    let ImageArgs { file, hardware, notes, allow_downgrade, .. } = image;
    let key = KeyDir::new(&keys).load("targets")?;
    let current = std::fs::read(&current).with_context(|| format!("cannot read {}", current.display()))?;
    let new = portcullis_firmware::repo::NewTarget {
        image: &file,
        hardware: &hardware,
        version: &v,
        notes: notes.as_deref(),
        allow_downgrade,
    };
    let signed = portcullis_firmware::repo::sign_targets(&current, new, &key, Expiry::default().targets)?;
    std::fs::write(&out, signed).with_context(|| format!("cannot write {}", out.display()))?;
    println!(
        "signed targets metadata with {hardware}/{v}/{} written to {}; import it with \
         `portcullis firmware import-targets {} --image {}`",
        file.file_name().and_then(|n| n.to_str()).unwrap_or("-"),
        out.display(),
        out.display(),
        file.display()
    );
    Ok(())
}

/// `firmware keys …` and `publish --keys`: they work on the data dir itself.
pub fn local(data_dir: &Path, cmd: FirmwareCmd) -> anyhow::Result<()> {
    let dir = data_dir.join("firmware");
    match cmd {
        FirmwareCmd::Keys(KeysCmd::Init { offline }) => {
            if dir.join("repo/metadata/1.root.json").exists() {
                bail!(
                    "{} already holds a firmware repository; its keys cannot be moved offline after the fact",
                    dir.display()
                );
            }
            let keys = KeyDir::new(&offline);
            keys.generate(&["root", "targets"])?;
            let repo = FirmwareRepo::open(&dir, Expiry::default(), Some(&keys))?;
            println!(
                "firmware repository created in {}\nroot and targets keys: {} (mode 0600) — store them offline; \
                 the server keeps only the snapshot and timestamp keys in {}",
                dir.display(),
                offline.display(),
                repo.keys().path("snapshot").parent().map(|p| p.display().to_string()).unwrap_or_default()
            );
        }
        FirmwareCmd::Keys(KeysCmd::RotateRoot { old, new }) => {
            let repo = FirmwareRepo::open(&dir, Expiry::default(), None)?;
            let new_keys = KeyDir::new(&new);
            if !new_keys.has("root") {
                new_keys.generate(&["root"])?;
            }
            let v = repo.rotate_root(&KeyDir::new(&old), &new_keys)?;
            println!(
                "root rotated: version {v} lists the key in {}; devices follow the chain on their next update",
                new.display()
            );
        }
        FirmwareCmd::Publish { image, keys: Some(keys), json } => {
            let repo = FirmwareRepo::open(&dir, Expiry::default(), None)?;
            let v = image.semver()?;
            let (file, hw, notes) = (&image.file, &image.hardware, image.notes.as_deref());
            let t = repo.publish(file, hw, &v, notes, image.allow_downgrade, Some(&KeyDir::new(keys)))?;
            let published = wire::FirmwarePublished { target: t };
            if json { crate::manage::print_json(&published) } else { print_target(&published.target) }
        }
        _ => unreachable!("only key custody runs locally"),
    }
    Ok(())
}
