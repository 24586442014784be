//! Judging a device service's TLS certificate.

use ::time::OffsetDateTime;
use x509_parser::prelude::*;
use x509_parser::public_key::PublicKey;

/// A problem with a served certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertIssue {
    /// `notAfter` has passed.
    Expired(String),
    /// `notBefore` is in the future.
    NotYetValid(String),
    /// Issued by itself.
    SelfSigned(String),
    /// RSA below 2048 bits or EC below 256.
    WeakKey(String),
    /// Signed with MD5 or SHA-1.
    WeakSignature(String),
    /// Could not be parsed at all.
    Unparsable,
}

impl CertIssue {
    /// Stable short name, used in finding keys.
    pub fn key(&self) -> &'static str {
        match self {
            Self::Expired(_) => "expired",
            Self::NotYetValid(_) => "not-yet-valid",
            Self::SelfSigned(_) => "self-signed",
            Self::WeakKey(_) => "weak-key",
            Self::WeakSignature(_) => "weak-signature",
            Self::Unparsable => "unparsable",
        }
    }
}

fn when(t: ASN1Time) -> String {
    t.to_datetime().format(&::time::format_description::well_known::Rfc3339).unwrap_or_else(|_| t.to_string())
}

/// Everything wrong with the leaf certificate `der` at `now`.
pub fn inspect(der: &[u8], now: OffsetDateTime) -> Vec<CertIssue> {
    let Ok((_, cert)) = X509Certificate::from_der(der) else { return vec![CertIssue::Unparsable] };
    let mut out = Vec::new();
    let v = cert.validity();
    if v.not_after.to_datetime() < now {
        out.push(CertIssue::Expired(format!("notAfter {}", when(v.not_after))));
    }
    if v.not_before.to_datetime() > now {
        out.push(CertIssue::NotYetValid(format!("notBefore {}", when(v.not_before))));
    }
    if cert.subject() == cert.issuer() && cert.verify_signature(None).is_ok() {
        out.push(CertIssue::SelfSigned(format!("subject = issuer = {}", cert.subject())));
    }
    match cert.public_key().parsed() {
        Ok(PublicKey::RSA(rsa)) if rsa.key_size() < 2048 => {
            out.push(CertIssue::WeakKey(format!("RSA {} bits", rsa.key_size())));
        }
        Ok(PublicKey::EC(ec)) if ec.key_size() < 256 => {
            out.push(CertIssue::WeakKey(format!("EC {} bits", ec.key_size())));
        }
        _ => {}
    }
    let alg = cert.signature_algorithm.algorithm.to_id_string();
    let weak = [
        ("1.2.840.113549.1.1.4", "md5WithRSAEncryption"),
        ("1.2.840.113549.1.1.5", "sha1WithRSAEncryption"),
        ("1.2.840.10045.4.1", "ecdsa-with-SHA1"),
        ("1.2.840.10040.4.3", "dsa-with-sha1"),
    ];
    if let Some((_, name)) = weak.iter().find(|(oid, _)| *oid == alg) {
        out.push(CertIssue::WeakSignature((*name).to_owned()));
    }
    out
}
