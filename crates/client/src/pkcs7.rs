//! Certs-only CMS SignedData ("degenerate PKCS#7", RFC 5652 / RFC 7030 4.1.3), the format
//! EST uses to carry certificates.

use cms::cert::CertificateChoices;
use cms::content_info::{CmsVersion, ContentInfo};
use cms::signed_data::{CertificateSet, EncapsulatedContentInfo, SignedData, SignerInfos};
use der::asn1::SetOfVec;
use der::oid::ObjectIdentifier;
use der::{Any, Decode, Encode};

const ID_DATA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.7.1");
const ID_SIGNED_DATA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.7.2");

/// Encodes DER certificates as a certs-only SignedData, DER.
pub fn certs_only(certs: &[&[u8]]) -> Result<Vec<u8>, der::Error> {
    let choices = certs
        .iter()
        .map(|c| x509_cert::Certificate::from_der(c).map(CertificateChoices::Certificate))
        .collect::<Result<Vec<_>, _>>()?;
    let sd = SignedData {
        version: CmsVersion::V1,
        digest_algorithms: SetOfVec::new(),
        encap_content_info: EncapsulatedContentInfo { econtent_type: ID_DATA, econtent: None },
        certificates: Some(CertificateSet(SetOfVec::try_from(choices)?)),
        crls: None,
        signer_infos: SignerInfos(SetOfVec::new()),
    };
    ContentInfo { content_type: ID_SIGNED_DATA, content: Any::encode_from(&sd)? }.to_der()
}

/// Extracts the DER certificates from a certs-only SignedData.
pub fn parse_certs_only(der: &[u8]) -> Result<Vec<Vec<u8>>, der::Error> {
    let ci = ContentInfo::from_der(der)?;
    if ci.content_type != ID_SIGNED_DATA {
        return Err(der::Error::from(der::ErrorKind::OidUnknown { oid: ci.content_type }));
    }
    let sd: SignedData = ci.content.decode_as()?;
    let mut out = Vec::new();
    for choice in sd.certificates.map(|s| s.0.into_vec()).unwrap_or_default() {
        if let CertificateChoices::Certificate(c) = choice {
            out.push(c.to_der()?);
        }
    }
    Ok(out)
}
