//! Certs-only PKCS#7 as the agent receives it from a server: parse, and round-trip what
//! parses.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(certs) = portcullis_pki::pkcs7::parse_certs_only(data) {
        let refs: Vec<&[u8]> = certs.iter().map(Vec::as_slice).collect();
        if let Ok(again) = portcullis_pki::pkcs7::certs_only(&refs) {
            let back = portcullis_pki::pkcs7::parse_certs_only(&again).expect("re-encoded PKCS#7 must parse");
            assert_eq!(back.len(), certs.len());
        }
    }
});
