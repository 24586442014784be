use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

fn write_mode(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    // Write to a sibling and rename, so a crash never leaves a half-written key or
    // certificate behind, and the file is never readable by others even for a moment.
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let mut f = OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(&tmp)?;
    f.write_all(contents)?;
    f.sync_all()?;
    drop(f);
    fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent()
        && let Ok(d) = fs::File::open(dir)
    {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Atomically writes a secret (key, token) readable by its owner only (mode 0600).
pub fn write_private(path: &Path, contents: &[u8]) -> io::Result<()> {
    write_mode(path, contents, 0o600)
}

/// Atomically writes a public file (certificate, address) with mode 0644.
pub fn write_public(path: &Path, contents: &[u8]) -> io::Result<()> {
    write_mode(path, contents, 0o644)
}

/// Base64 of `der` in lines of 64 characters, each ending in `\n` (RFC 7468 layout).
pub fn base64_lines(der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::with_capacity(b64.len() + b64.len() / 64 + 1);
    for chunk in b64.as_bytes().chunks(64) {
        // Base64 output is ASCII, so every chunk is valid UTF-8.
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out
}

/// PEM armour (RFC 7468) around `der` with `label`, e.g. `CERTIFICATE` or `X509 CRL`.
pub fn pem_encode(label: &str, der: &[u8]) -> String {
    format!("-----BEGIN {label}-----\n{}-----END {label}-----\n", base64_lines(der))
}
