//! PKCS#10 requests from untrusted bytes.
//!
//! [`decode_est_body`] turns an EST request body (base64 DER, RFC 7030 4.2.1; PEM is
//! accepted as a courtesy) into DER; [`validate`] parses it, checks its self-signature
//! and refuses weak or unsupported keys. Both are total functions over arbitrary input
//! and are fuzzed (`fuzz/fuzz_targets/est_body.rs`).

use std::fmt;

use base64::Engine;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_PKCS1_RSAENCRYPTION,
    OID_PKCS1_SHA1WITHRSA, OID_SHA1_WITH_RSA, OID_SIG_ED25519,
};
use x509_parser::prelude::FromDer;
use x509_parser::public_key::PublicKey;

/// Largest EST request body accepted, in bytes.
pub const MAX_BODY: usize = 64 * 1024;
/// Smallest RSA modulus accepted, in bits.
pub const MIN_RSA_BITS: usize = 2048;

/// Why a CSR was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CsrError {
    /// The body was empty.
    #[error("request body is empty; expected a base64-encoded PKCS#10 request")]
    Empty,
    /// The body exceeded [`MAX_BODY`].
    #[error("request body is {len} bytes, more than the {max} allowed")]
    TooLarge {
        /// Its size.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The body was not valid base64.
    #[error("request body is not valid base64: {0}")]
    Base64(String),
    /// The bytes are not a DER PKCS#10 request.
    #[error("not a DER-encoded PKCS#10 certification request: {0}")]
    Der(String),
    /// The request's self-signature does not verify.
    #[error("the CSR's signature does not verify with its own public key")]
    BadSignature,
    /// The signature algorithm is obsolete.
    #[error("the CSR is signed with {0}, which is not accepted (use SHA-256 or better)")]
    WeakSignature(&'static str),
    /// The key is too small.
    #[error("weak key: RSA {bits} bits, at least {min} required")]
    WeakKey {
        /// Its size.
        bits: usize,
        /// The minimum.
        min: usize,
    },
    /// The key type or curve is not accepted.
    #[error("unsupported key: {0}; accepted are ECDSA P-256, ECDSA P-384, Ed25519 and RSA >= 2048 bits")]
    UnsupportedKey(String),
}

/// The kind of public key in an accepted CSR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    /// ECDSA on P-256.
    EcdsaP256,
    /// ECDSA on P-384.
    EcdsaP384,
    /// Ed25519.
    Ed25519,
    /// RSA with this many modulus bits.
    Rsa(usize),
}

impl fmt::Display for KeyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::EcdsaP256 => f.write_str("ECDSA P-256"),
            Self::EcdsaP384 => f.write_str("ECDSA P-384"),
            Self::Ed25519 => f.write_str("Ed25519"),
            Self::Rsa(bits) => write!(f, "RSA {bits}"),
        }
    }
}

/// A CSR whose signature verified and whose key is acceptable. Only its public key is
/// ever used.
#[derive(Debug, Clone)]
pub struct ValidCsr {
    key: rcgen::SubjectPublicKeyInfo,
    kind: KeyKind,
    subject: String,
}

impl ValidCsr {
    /// The requested public key.
    pub fn public_key(&self) -> &rcgen::SubjectPublicKeyInfo {
        &self.key
    }

    /// Its kind.
    pub fn key_kind(&self) -> KeyKind {
        self.kind
    }

    /// The requested subject, for logs only (it is not copied into certificates).
    pub fn requested_subject(&self) -> &str {
        &self.subject
    }
}

/// Decodes an EST body: base64 of DER, with any whitespace; PEM armour is tolerated.
pub fn decode_est_body(body: &[u8]) -> Result<Vec<u8>, CsrError> {
    if body.len() > MAX_BODY {
        return Err(CsrError::TooLarge { len: body.len(), max: MAX_BODY });
    }
    let text = std::str::from_utf8(body).map_err(|_| CsrError::Base64("body is not ASCII text".into()))?;
    let mut b64 = String::with_capacity(text.len());
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with("-----BEGIN ") || line.starts_with("-----END ") {
            continue;
        }
        b64.extend(line.chars().filter(|c| !c.is_ascii_whitespace()));
    }
    if b64.is_empty() {
        return Err(CsrError::Empty);
    }
    base64::engine::general_purpose::STANDARD
        .decode(b64.as_bytes())
        .map_err(|e| CsrError::Base64(e.to_string()))
}

fn rsa_bits(modulus: &[u8]) -> usize {
    let m = match modulus.iter().position(|b| *b != 0) {
        Some(i) => &modulus[i..],
        None => return 0,
    };
    m.len() * 8 - m[0].leading_zeros() as usize
}

/// Parses and checks a DER PKCS#10 request.
pub fn validate(der: &[u8]) -> Result<ValidCsr, CsrError> {
    let (rest, csr) = X509CertificationRequest::from_der(der).map_err(|e| CsrError::Der(e.to_string()))?;
    if !rest.is_empty() {
        return Err(CsrError::Der(format!("{} trailing bytes after the request", rest.len())));
    }
    let sig = &csr.signature_algorithm.algorithm;
    if *sig == OID_PKCS1_SHA1WITHRSA || *sig == OID_SHA1_WITH_RSA {
        return Err(CsrError::WeakSignature("sha1WithRSAEncryption"));
    }

    let info = &csr.certification_request_info;
    let spki = &info.subject_pki;
    let alg = &spki.algorithm.algorithm;
    let kind = if *alg == OID_PKCS1_RSAENCRYPTION {
        let bits = match spki.parsed() {
            Ok(PublicKey::RSA(rsa)) => rsa_bits(rsa.modulus),
            _ => return Err(CsrError::Der("malformed RSA public key".into())),
        };
        if bits < MIN_RSA_BITS {
            return Err(CsrError::WeakKey { bits, min: MIN_RSA_BITS });
        }
        if bits > 8192 {
            return Err(CsrError::UnsupportedKey(format!("RSA {bits} bits (at most 8192)")));
        }
        KeyKind::Rsa(bits)
    } else if *alg == OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = spki.algorithm.parameters.as_ref().and_then(|p| p.as_oid().ok());
        match curve {
            Some(c) if c == OID_EC_P256 => KeyKind::EcdsaP256,
            Some(c) if c == OID_NIST_EC_P384 => KeyKind::EcdsaP384,
            Some(c) => return Err(CsrError::UnsupportedKey(format!("EC curve {c}"))),
            None => return Err(CsrError::Der("EC key without a named curve".into())),
        }
    } else if *alg == OID_SIG_ED25519 {
        KeyKind::Ed25519
    } else {
        return Err(CsrError::UnsupportedKey(format!("key algorithm {alg}")));
    };

    csr.verify_signature().map_err(|_| CsrError::BadSignature)?;

    let key = rcgen::SubjectPublicKeyInfo::from_der(spki.raw)
        .map_err(|e| CsrError::UnsupportedKey(format!("{kind}: {e}")))?;
    Ok(ValidCsr { key, kind, subject: info.subject.to_string() })
}

/// [`decode_est_body`] then [`validate`]: the whole untrusted-input path of an EST request.
pub fn parse_est_body(body: &[u8]) -> Result<ValidCsr, CsrError> {
    validate(&decode_est_body(body)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn csr_for(alg: &'static rcgen::SignatureAlgorithm) -> Vec<u8> {
        let key = rcgen::KeyPair::generate_for(alg).unwrap();
        let params = rcgen::CertificateParams::new(vec!["ignored.example".to_string()]).unwrap();
        params.serialize_request(&key).unwrap().der().to_vec()
    }

    #[test]
    fn accepts_p256_p384_ed25519() {
        assert_eq!(
            validate(&csr_for(&rcgen::PKCS_ECDSA_P256_SHA256)).unwrap().key_kind(),
            KeyKind::EcdsaP256
        );
        assert_eq!(
            validate(&csr_for(&rcgen::PKCS_ECDSA_P384_SHA384)).unwrap().key_kind(),
            KeyKind::EcdsaP384
        );
        assert_eq!(validate(&csr_for(&rcgen::PKCS_ED25519)).unwrap().key_kind(), KeyKind::Ed25519);
    }

    #[test]
    fn tampered_signature_is_refused() {
        let mut der = csr_for(&rcgen::PKCS_ECDSA_P256_SHA256);
        let n = der.len();
        der[n - 3] ^= 0x55;
        let err = validate(&der).unwrap_err();
        assert!(matches!(err, CsrError::BadSignature | CsrError::Der(_)), "{err:?}");
    }

    #[test]
    fn tampered_subject_breaks_signature() {
        let der = csr_for(&rcgen::PKCS_ECDSA_P256_SHA256);
        // Flip a byte inside the requested SAN, which the signature covers.
        let pos = der.windows(7).position(|w| w == b"ignored").unwrap();
        let mut bad = der.clone();
        bad[pos] = b'J';
        assert_eq!(validate(&bad).unwrap_err(), CsrError::BadSignature);
    }

    #[test]
    fn body_decoding() {
        use base64::Engine;
        let der = csr_for(&rcgen::PKCS_ECDSA_P256_SHA256);
        let b64 = base64::engine::general_purpose::STANDARD.encode(&der);
        let wrapped: String =
            b64.as_bytes().chunks(64).map(|c| format!("{}\r\n", std::str::from_utf8(c).unwrap())).collect();
        assert_eq!(decode_est_body(wrapped.as_bytes()).unwrap(), der);
        let pem =
            format!("-----BEGIN CERTIFICATE REQUEST-----\n{wrapped}-----END CERTIFICATE REQUEST-----\n");
        assert_eq!(decode_est_body(pem.as_bytes()).unwrap(), der);
        assert_eq!(decode_est_body(b"").unwrap_err(), CsrError::Empty);
        assert!(matches!(decode_est_body(b"!!!not base64").unwrap_err(), CsrError::Base64(_)));
        assert!(matches!(decode_est_body(&vec![b'A'; MAX_BODY + 1]).unwrap_err(), CsrError::TooLarge { .. }));
        assert!(matches!(parse_est_body(b"aGVsbG8=").unwrap_err(), CsrError::Der(_)));
    }

    #[test]
    fn rsa_bit_counting() {
        assert_eq!(rsa_bits(&[0x00, 0x80, 0, 0]), 24);
        assert_eq!(rsa_bits(&[0x01, 0xff]), 9);
        assert_eq!(rsa_bits(&[]), 0);
    }
}
