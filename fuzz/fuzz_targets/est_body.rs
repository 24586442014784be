//! The whole untrusted-input path of an EST enrollment body: base64/PEM decoding, PKCS#10
//! parsing, key checks and signature verification. It must never panic, and anything it
//! accepts must have a key the CA can certify.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(csr) = portcullis_pki::csr::parse_est_body(data) {
        let _ = csr.key_kind();
    }
    // The DER parser on its own too, so the fuzzer need not learn base64 first.
    let _ = portcullis_pki::csr::validate(data);
});
