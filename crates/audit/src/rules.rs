//! The finding rules: pure functions from what a probe saw (a service on a port, the
//! device's registry record and certificates, its firmware report) and the device's
//! profile to findings. No I/O, no clock but the one passed in, so each rule is tested
//! beside it.

use std::collections::BTreeSet;
use std::net::SocketAddr;

use portcullis_core::{CertState, DeviceState};
use time::OffsetDateTime;

use crate::engine::{Outdated, Target};
use crate::finding::{Finding, Severity, baseline as b};
use crate::probe::{Kind, Service};
use crate::tlscheck::{self, CertIssue};
use crate::wire;

const RISKY_PORTS: &[u16] =
    &[23, 1023, 2323, 2332, 23231, 5555, 7547, 37215, 52869, 9527, 9530, 502, 20000, 5900];

// Positional on purpose: every call site reads as the finding's fields in order.
#[allow(clippy::too_many_arguments)]
fn finding(
    device: &str,
    key: String,
    check: &'static str,
    severity: Severity,
    title: String,
    target: String,
    evidence: String,
    why: &'static str,
    remediation: String,
    baselines: &'static [&'static str],
) -> Finding {
    Finding {
        device: device.to_owned(),
        key,
        check,
        severity,
        title,
        target,
        evidence,
        why,
        remediation,
        baselines,
    }
}

pub(crate) fn port_findings(
    id: &str,
    t: &Target,
    addr: SocketAddr,
    svc: &Service,
    scan_only: bool,
    legacy_tls: bool,
) -> Vec<Finding> {
    let port = addr.port();
    let mut out = Vec::new();
    let name = match (scan_only, legacy_tls) {
        (true, _) => "not identified: scan only".to_owned(),
        (false, true) => "tls (legacy versions only)".to_owned(),
        (false, false) => svc.name(),
    };
    let said = if svc.banner.is_empty() { String::new() } else { format!("; it said {:?}", svc.banner) };
    let allowed = t.profile.as_ref().is_some_and(|p| p.allows_tcp(port));
    if !allowed {
        let why_not = match (&t.profile_name, &t.profile) {
            (Some(n), Some(_)) => format!("profile {n} does not allow TCP {port}"),
            (Some(n), None) => format!("profile {n} is missing or unreadable, so nothing is allowed"),
            (None, _) => "the device has no profile, so nothing is allowed".to_owned(),
        };
        out.push(finding(
            id,
            format!("exposure/tcp/{port}"),
            "exposure",
            if RISKY_PORTS.contains(&port) || svc.kind == Kind::Telnet { Severity::High } else { Severity::Medium },
            format!("TCP {port} ({name}) is open but not allowed"),
            addr.to_string(),
            format!("TCP connect to {addr} succeeded; service: {name}{said}; {why_not}"),
            "Every listening service is a way in; ports the device's job does not need are attack surface that botnets scan the whole Internet for.",
            format!("Disable the service on TCP {port} in the device's configuration or firmware; if the device needs it, add {port} to its profile."),
            &[b::ETSI_5_6_1, b::OWASP_I2],
        ));
    }
    if scan_only {
        return out;
    }
    let plaintext = match (svc.kind, svc.tls.is_some()) {
        (_, true) => None,
        (Kind::Telnet, _) => Some((
            Severity::High,
            "Telnet sends logins and commands in clear text",
            "Disable telnet; use SSH with keys for maintenance, or nothing.",
        )),
        (Kind::Ftp, _) => Some((
            Severity::Medium,
            "FTP sends logins and files in clear text",
            "Disable FTP; deliver files over HTTPS or SFTP.",
        )),
        (Kind::Http, _) => Some((
            Severity::Medium,
            "HTTP without TLS exposes sessions and passwords on the path",
            "Serve the interface over HTTPS only (and redirect or close port 80).",
        )),
        (Kind::Mqtt, _) => Some((
            Severity::Medium,
            "MQTT without TLS exposes credentials and telemetry on the path",
            "Use MQTT over TLS (8883) with client certificates; close 1883.",
        )),
        _ => None,
    };
    if let Some((sev, title, fix)) = plaintext {
        out.push(finding(
            id,
            format!("plaintext/{port}/{}", svc.kind.name()),
            "plaintext",
            sev,
            format!("{title} (TCP {port})"),
            addr.to_string(),
            format!("{} spoken without TLS on {addr}", svc.kind.name()),
            "Anyone on the network path can read and alter plaintext traffic: passwords, commands, firmware and data.",
            fix.to_owned(),
            &[b::ETSI_5_5_1, b::OWASP_I7],
        ));
    }
    if svc.tls.is_none() && !legacy_tls && t.profile.as_ref().is_some_and(|p| p.requires_tls(port)) {
        out.push(finding(
            id,
            format!("tls-required/{port}"),
            "tls",
            Severity::High,
            format!("TCP {port} must speak TLS but does not"),
            addr.to_string(),
            format!("the profile requires TLS on {port}; a TLS handshake failed and the service answered as {name}"),
            "The profile says this service carries traffic that must be encrypted and authenticated.",
            format!("Enable TLS on port {port} (TLS 1.2 or later) with a certificate from the fleet CA."),
            &[b::ETSI_5_5_1, b::OWASP_I7],
        ));
    }
    if svc.kind == Kind::Mqtt && svc.mqtt_anonymous == Some(0) {
        out.push(finding(
            id,
            format!("credentials/{port}/mqtt-anonymous"),
            "credentials",
            Severity::High,
            format!("MQTT broker on TCP {port} accepts anonymous clients"),
            addr.to_string(),
            "CONNECT without user name or password was accepted (CONNACK 0)".to_owned(),
            "Anyone who can reach the broker can read every topic and publish commands to the devices that listen to it.",
            "Require authentication on the broker (allow_anonymous false), preferably client certificates over TLS.".to_owned(),
            &[b::ETSI_5_6_2, b::OWASP_I9],
        ));
    }
    if let Some(info) = &svc.tls {
        let issues =
            info.chain.first().map(|c| tlscheck::inspect(c, OffsetDateTime::now_utc())).unwrap_or_default();
        for issue in issues {
            let (sev, title, detail) = match &issue {
                CertIssue::Expired(d) => (Severity::High, "certificate expired", d.clone()),
                CertIssue::NotYetValid(d) => (Severity::Medium, "certificate not yet valid", d.clone()),
                CertIssue::SelfSigned(d) => (Severity::Medium, "certificate is self-signed", d.clone()),
                CertIssue::WeakKey(d) => (Severity::High, "certificate key is weak", d.clone()),
                CertIssue::WeakSignature(d) => {
                    (Severity::Medium, "certificate signed with a broken hash", d.clone())
                }
                CertIssue::Unparsable => (Severity::Medium, "certificate cannot be parsed", String::new()),
            };
            out.push(finding(
                id,
                format!("tls/{port}/{}", issue.key()),
                "tls",
                sev,
                format!("TLS on TCP {port}: {title}"),
                addr.to_string(),
                format!("{} with {}; {detail}", info.version, info.suite),
                "Clients that accept such certificates cannot tell the device from an impostor, and clients that do not will fail; either way the channel's security rests on nothing.",
                "Issue the service a certificate from the fleet CA (or a public CA) with an RSA ≥ 2048 or EC P-256 key and SHA-256, and renew it before expiry.".to_owned(),
                &[b::ETSI_5_5_1, b::OWASP_I7],
            ));
        }
    }
    out
}

pub(crate) fn legacy_tls(id: &str, addr: SocketAddr, v: u16) -> Finding {
    finding(
        id,
        format!("tls/{}/legacy-version", addr.port()),
        "tls",
        Severity::Medium,
        format!("TLS on TCP {} still accepts {}", addr.port(), wire::tls_version_name(v)),
        addr.to_string(),
        format!("a ClientHello offering at most TLS 1.1 got a ServerHello for {}", wire::tls_version_name(v)),
        "TLS before 1.2 relies on broken constructions (CBC padding oracles, SHA-1/MD5 PRF) and lets an attacker downgrade clients.",
        "Configure the service for TLS 1.2 and 1.3 only.".to_owned(),
        &[b::ETSI_5_5_1, b::OWASP_I5],
    )
}

pub(crate) fn default_credential(
    id: &str,
    addr: SocketAddr,
    svc: &Service,
    user: &str,
    nth: usize,
) -> Finding {
    finding(
        id,
        format!("credentials/{}/{}", addr.port(), svc.name()),
        "credentials",
        Severity::Critical,
        format!("default credential accepted by {} on TCP {}", svc.name(), addr.port()),
        addr.to_string(),
        format!(
            "credential accepted for user {user} (pair {nth} of the default-credential list; password withheld)"
        ),
        "Default and Mirai-table passwords are the first thing every IoT botnet tries; a device that accepts one is taken over in minutes once reachable.",
        format!(
            "Set a unique password for {user} (or disable password login), and make the firmware refuse to run with its factory default."
        ),
        &[b::ETSI_5_1_1, b::OWASP_I1],
    )
}

pub(crate) fn firmware_finding(o: &Outdated) -> Finding {
    finding(
        &o.device,
        "firmware/outdated".into(),
        "firmware",
        Severity::Medium,
        "firmware older than the newest published for its hardware".into(),
        o.device.clone(),
        format!(
            "running {} (last report of its agent); newest published for hardware {}: {}",
            o.installed, o.hardware, o.newest
        ),
        "Published firmware usually fixes vulnerabilities; a device that does not take it keeps them, and an outdated fleet is how botnets recruit.",
        format!(
            "Roll the update out to it (`portcullis firmware rollout create --hardware {} --version {}`), or find out why its agent does not install it (`portcullis firmware status --hardware {}`).",
            o.hardware, o.newest, o.hardware
        ),
        &[b::ETSI_5_3_8, b::ETSI_5_3_2, b::OWASP_I4, b::OWASP_I5],
    )
}

pub(crate) fn identity_checks(
    t: &Target,
    seen: bool,
    certs: &[portcullis_store::CertificateRecord],
    now: OffsetDateTime,
    expiry_days: u32,
) -> Vec<Finding> {
    let id = t.device.id.as_str();
    let mut out = Vec::new();
    let target = id.to_owned();
    if t.device.state == DeviceState::Revoked && seen {
        out.push(finding(
            id,
            "identity/revoked-online".into(),
            "identity",
            Severity::Critical,
            "revoked device still answers on the network".into(),
            target.clone(),
            format!("device state revoked; open ports found on {}", t.addrs.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")),
            "A revoked device was taken out of the fleet for a reason (compromise, theft, decommissioning); if it still runs on the network it can still attack its neighbours.",
            "Disconnect or wipe the device, or block its address at the network edge.".into(),
            &[b::ETSI_5_5_8, b::OWASP_I8],
        ));
    }
    if t.device.state == DeviceState::Active {
        let newest = certs
            .iter()
            .filter(|c| c.device == t.device.id && c.state == CertState::Valid)
            .max_by_key(|c| c.not_after);
        if let Some(c) = newest {
            let left = c.not_after - now;
            if left < time::Duration::days(i64::from(expiry_days)) {
                let expired = left.is_negative();
                out.push(finding(
                    id,
                    "identity/cert-expiring".into(),
                    "identity",
                    if expired { Severity::High } else { Severity::Medium },
                    if expired { "device certificate expired".into() } else { format!("device certificate expires within {expiry_days} days") },
                    target.clone(),
                    format!("certificate {} notAfter {}", c.serial, c.not_after.format(&time::format_description::well_known::Rfc3339).unwrap_or_default()),
                    "A device whose certificate lapses loses its identity: the gateway and DNS port stop serving it, and operators tend to fix that by weakening checks.",
                    "Check the device agent's renewal (portcullis-agent renews at two thirds of the lifetime) or re-enroll the device.".into(),
                    &[b::ETSI_5_5_8, b::OWASP_I8],
                ));
            }
        }
    }
    // One key on two devices: a cloned or factory-baked key.
    let mine: BTreeSet<&str> = certs
        .iter()
        .filter(|c| c.device == t.device.id && c.state == CertState::Valid)
        .map(|c| c.spki_sha256.as_str())
        .collect();
    let mut others: BTreeSet<&str> = BTreeSet::new();
    for c in certs {
        if c.device != t.device.id && c.state == CertState::Valid && mine.contains(c.spki_sha256.as_str()) {
            others.insert(c.device.as_str());
        }
    }
    if !others.is_empty() {
        out.push(finding(
            id,
            "identity/shared-key".into(),
            "identity",
            Severity::High,
            "device shares its key pair with other devices".into(),
            target,
            format!("the public key of this device's certificate is also certified for {}", others.into_iter().collect::<Vec<_>>().join(", ")),
            "Devices with the same private key are indistinguishable: compromising one impersonates all, and revoking one does not stop the others' key.",
            "Generate a fresh key on each device (portcullis-agent does by default), re-enroll, and revoke the shared certificates.".into(),
            &[b::ETSI_5_4_3, b::OWASP_I8],
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use portcullis_core::{DeviceId, Fingerprint, GroupName, Serial};
    use portcullis_store::Profile;
    use portcullis_store::{CertificateRecord, Device};

    fn target(state: DeviceState, profile: Option<Profile>) -> Target {
        let now = OffsetDateTime::now_utc();
        Target {
            device: Device {
                id: DeviceId::try_new("cam-01").unwrap(),
                group: GroupName::try_new("cameras").unwrap(),
                state,
                state_reason: None,
                created_at: now,
                updated_at: now,
                certificates: 1,
                cert_not_after: None,
                addresses: vec!["10.0.0.5".into()],
                profile: profile.as_ref().map(|_| "camera".to_owned()),
            },
            profile_name: profile.as_ref().map(|_| "camera".to_owned()),
            profile,
            addrs: vec!["10.0.0.5".parse().unwrap()],
        }
    }

    fn camera() -> Profile {
        Profile { tcp: vec![443, 1883], tls_required: vec![443], ..Profile::default() }
    }

    fn service(kind: Kind) -> Service {
        Service { kind, tls: None, banner: String::new(), http: None, mqtt_anonymous: None }
    }

    fn keys(found: &[Finding]) -> Vec<&str> {
        found.iter().map(|f| f.key.as_str()).collect()
    }

    #[test]
    fn a_port_the_profile_does_not_allow_is_exposure_and_risky_ports_are_high() {
        let t = target(DeviceState::Active, Some(camera()));
        let telnet =
            port_findings("cam-01", &t, "10.0.0.5:23".parse().unwrap(), &service(Kind::Telnet), false, false);
        assert_eq!(keys(&telnet), ["exposure/tcp/23", "plaintext/23/telnet"]);
        assert!(telnet.iter().all(|f| f.severity == Severity::High));
        assert!(
            telnet[0].evidence.contains("profile camera does not allow TCP 23"),
            "{}",
            telnet[0].evidence
        );

        let rtsp =
            port_findings("cam-01", &t, "10.0.0.5:554".parse().unwrap(), &service(Kind::Rtsp), false, false);
        assert_eq!(keys(&rtsp), ["exposure/tcp/554"]);
        assert_eq!(rtsp[0].severity, Severity::Medium);

        // No profile: nothing is allowed, and the finding says why.
        let bare = target(DeviceState::Active, None);
        let ssh =
            port_findings("cam-01", &bare, "10.0.0.5:22".parse().unwrap(), &service(Kind::Ssh), false, false);
        assert_eq!(keys(&ssh), ["exposure/tcp/22"]);
        assert!(ssh[0].evidence.contains("has no profile"), "{}", ssh[0].evidence);
    }

    #[test]
    fn allowed_ports_still_get_plaintext_tls_and_anonymous_broker_findings() {
        let t = target(DeviceState::Active, Some(camera()));
        let mut mqtt = service(Kind::Mqtt);
        mqtt.mqtt_anonymous = Some(0);
        let found = port_findings("cam-01", &t, "10.0.0.5:1883".parse().unwrap(), &mqtt, false, false);
        assert_eq!(keys(&found), ["plaintext/1883/mqtt", "credentials/1883/mqtt-anonymous"]);
        // A broker that refuses anonymous clients (CONNACK 5) is no finding.
        mqtt.mqtt_anonymous = Some(5);
        let found = port_findings("cam-01", &t, "10.0.0.5:1883".parse().unwrap(), &mqtt, false, false);
        assert_eq!(keys(&found), ["plaintext/1883/mqtt"]);
        // The profile requires TLS on 443 and plain HTTP answered.
        let found =
            port_findings("cam-01", &t, "10.0.0.5:443".parse().unwrap(), &service(Kind::Http), false, false);
        assert_eq!(keys(&found), ["plaintext/443/http", "tls-required/443"]);
        // Scan only: exposure alone, nothing claimed about the service.
        let found =
            port_findings("cam-01", &t, "10.0.0.5:8080".parse().unwrap(), &service(Kind::Http), true, false);
        assert_eq!(keys(&found), ["exposure/tcp/8080"]);
        assert!(found[0].title.contains("not identified"));
    }

    #[test]
    fn default_credentials_never_show_the_password() {
        let f =
            default_credential("cam-01", "10.0.0.5:23".parse().unwrap(), &service(Kind::Telnet), "root", 3);
        assert_eq!(f.severity, Severity::Critical);
        assert_eq!(f.key, "credentials/23/telnet");
        assert!(
            f.evidence.contains("user root") && f.evidence.contains("password withheld"),
            "{}",
            f.evidence
        );
    }

    #[test]
    fn outdated_firmware_names_the_versions_and_the_rollout_to_run() {
        let o = Outdated {
            device: "cam-01".into(),
            hardware: "cam-v2".into(),
            installed: "1.0.0".into(),
            newest: "1.2.0".into(),
        };
        let f = firmware_finding(&o);
        assert_eq!((f.key.as_str(), f.severity), ("firmware/outdated", Severity::Medium));
        assert!(f.evidence.contains("running 1.0.0") && f.evidence.contains("1.2.0"), "{}", f.evidence);
        assert!(f.remediation.contains("--hardware cam-v2 --version 1.2.0"), "{}", f.remediation);
    }

    fn cert(device: &str, spki: &str, not_after: OffsetDateTime, state: CertState) -> CertificateRecord {
        let now = OffsetDateTime::now_utc();
        CertificateRecord {
            serial: Serial::from_bytes(spki.as_bytes()),
            device: DeviceId::try_new(device).unwrap(),
            fingerprint: Fingerprint::of(spki.as_bytes()),
            spki_sha256: spki.into(),
            not_before: now - time::Duration::days(1),
            not_after,
            state,
            revoked_at: None,
            revocation_reason: None,
            issued_via: "enroll".into(),
            der: Vec::new(),
            crl_reason: None,
            superseded_by: None,
            issued_at: now,
        }
    }

    #[test]
    fn identity_rules_revoked_online_expiring_and_shared_keys() {
        let now = OffsetDateTime::now_utc();
        let soon = now + time::Duration::days(3);
        let later = now + time::Duration::days(90);

        // A revoked device seen on the network.
        let revoked = target(DeviceState::Revoked, None);
        assert_eq!(keys(&identity_checks(&revoked, true, &[], now, 14)), ["identity/revoked-online"]);
        assert!(identity_checks(&revoked, false, &[], now, 14).is_empty(), "not seen: nothing to say");

        // Active, certificate inside the expiry window: medium; expired: high.
        let active = target(DeviceState::Active, None);
        let found = identity_checks(&active, true, &[cert("cam-01", "k1", soon, CertState::Valid)], now, 14);
        assert_eq!((keys(&found), found[0].severity), (vec!["identity/cert-expiring"], Severity::Medium));
        let past = now - time::Duration::days(1);
        let found = identity_checks(&active, true, &[cert("cam-01", "k1", past, CertState::Valid)], now, 14);
        assert_eq!(found[0].severity, Severity::High);
        // Only the newest valid certificate counts.
        let certs =
            [cert("cam-01", "k1", soon, CertState::Valid), cert("cam-01", "k2", later, CertState::Valid)];
        assert!(identity_checks(&active, true, &certs, now, 14).is_empty());

        // The same key certified for another device; a revoked copy does not count.
        let certs = [
            cert("cam-01", "k1", later, CertState::Valid),
            cert("cam-02", "k1", later, CertState::Valid),
            cert("cam-03", "k1", later, CertState::Revoked),
        ];
        let found = identity_checks(&active, true, &certs, now, 14);
        assert_eq!(keys(&found), ["identity/shared-key"]);
        assert!(found[0].evidence.ends_with("cam-02"), "{}", found[0].evidence);
    }
}
