use super::*;
use x509_parser::prelude::*;

fn new_ca() -> (tempfile::TempDir, Ca) {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::init(&dir.path().join("ca"), TrustDomain::try_new("fleet.test").unwrap()).unwrap();
    (dir, ca)
}

fn csr(alg: &'static rcgen::SignatureAlgorithm, params: rcgen::CertificateParams) -> ValidCsr {
    let key = KeyPair::generate_for(alg).unwrap();
    crate::csr::validate(params.serialize_request(&key).unwrap().der()).unwrap()
}

#[test]
fn init_refuses_to_overwrite_and_keys_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let (dir, _ca) = new_ca();
    let ca_dir = dir.path().join("ca");
    for key in [ROOT_KEY, ISSUING_KEY] {
        let mode = fs::metadata(ca_dir.join(key)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{key}");
    }
    assert!(matches!(
        Ca::init(&ca_dir, TrustDomain::try_new("other").unwrap()),
        Err(CaError::AlreadyExists(_))
    ));
    let loaded = Ca::load(&ca_dir).unwrap();
    assert_eq!(loaded.trust_domain().as_str(), "fleet.test");
    assert!(!format!("{loaded:?}").contains("PRIVATE"));
}

#[test]
fn load_refuses_world_readable_key() {
    use std::os::unix::fs::PermissionsExt;
    let (dir, _ca) = new_ca();
    let key = dir.path().join("ca").join(ISSUING_KEY);
    fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
    assert!(matches!(Ca::load(&dir.path().join("ca")), Err(CaError::Invalid { .. })));
}

#[test]
fn device_certificate_content_is_decided_by_the_ca() {
    let (_dir, ca) = new_ca();
    // A hostile CSR: asks to be a CA, for other names and for serverAuth.
    let mut asked = rcgen::CertificateParams::new(vec!["evil.example".to_string()]).unwrap();
    asked.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    asked.extended_key_usages =
        vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::CodeSigning];
    asked.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    asked.distinguished_name.push(DnType::CommonName, "someone-else");
    let csr = csr(&rcgen::PKCS_ECDSA_P256_SHA256, asked);
    let id = DeviceId::try_new("cam-01").unwrap();
    let issued = ca.issue_device(&id, &csr, Duration::from_secs(30 * 86400)).unwrap();
    let (_, cert) = X509Certificate::from_der(&issued.der).unwrap();

    assert_eq!(Serial::from_bytes(cert.raw_serial()), issued.serial);
    assert!(cert.raw_serial().len() >= 15, "serial carries ~128 random bits");
    let cn: Vec<_> = cert.subject().iter_common_name().map(|c| c.as_str().unwrap().to_owned()).collect();
    assert_eq!(cn, ["cam-01"]);
    let san = cert.subject_alternative_name().unwrap().unwrap();
    let names: Vec<String> = san.value.general_names.iter().map(|g| g.to_string()).collect();
    assert_eq!(names, ["URI(spiffe://fleet.test/device/cam-01)"]);
    let bc = cert.basic_constraints().unwrap().unwrap();
    assert!(!bc.value.ca);
    let eku = cert.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.client_auth && !eku.server_auth && !eku.code_signing);
    let ku = cert.key_usage().unwrap().unwrap().value;
    assert!(ku.digital_signature() && !ku.key_cert_sign());
    let lifetime = cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp();
    assert_eq!(lifetime, 30 * 86400 + 300);

    // Chains to the issuing CA.
    let (_, issuing) = X509Certificate::from_der(ca.issuing_der()).unwrap();
    cert.verify_signature(Some(issuing.public_key())).unwrap();
    let (_, root) = X509Certificate::from_der(ca.root_der()).unwrap();
    issuing.verify_signature(Some(root.public_key())).unwrap();
}

#[test]
fn serials_are_unique() {
    let (_dir, ca) = new_ca();
    let csr = csr(&rcgen::PKCS_ED25519, rcgen::CertificateParams::default());
    let id = DeviceId::try_new("d").unwrap();
    let mut seen = std::collections::HashSet::new();
    for _ in 0..200 {
        assert!(seen.insert(ca.issue_device(&id, &csr, Duration::from_secs(60)).unwrap().serial));
    }
}

#[test]
fn crl_lists_revoked_serials() {
    let (_dir, ca) = new_ca();
    let serial = Serial::parse("0123456789abcdef0123456789abcdef").unwrap();
    let other = Serial::parse("0a").unwrap();
    let now = OffsetDateTime::now_utc();
    let der = ca
        .crl(
            &[
                RevokedEntry { serial: serial.clone(), revoked_at: now, reason: Some("superseded".into()) },
                RevokedEntry { serial: other.clone(), revoked_at: now, reason: None },
            ],
            7,
            Duration::from_secs(3600),
        )
        .unwrap();
    let (_, crl) = CertificateRevocationList::from_der(&der).unwrap();
    let listed: Vec<(Serial, Option<u8>)> = crl
        .iter_revoked_certificates()
        .map(|r| (Serial::from_bytes(r.raw_serial()), r.reason_code().map(|(_, c)| c.0)))
        .collect();
    assert_eq!(listed, [(serial, Some(4)), (other, None)]);
    let (_, issuing) = X509Certificate::from_der(ca.issuing_der()).unwrap();
    crl.verify_signature(issuing.public_key()).unwrap();
}

#[test]
fn pkcs7_round_trip() {
    let (_dir, ca) = new_ca();
    let p7 = crate::pkcs7::certs_only(&[ca.root_der(), ca.issuing_der()]).unwrap();
    let mut back = crate::pkcs7::parse_certs_only(&p7).unwrap();
    back.sort();
    let mut want = vec![ca.root_der().to_vec(), ca.issuing_der().to_vec()];
    want.sort();
    assert_eq!(back, want);
}
