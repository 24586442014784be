//! Blocklist/allowlist text as downloaded from anywhere: parsed, then matched against.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis_dns::DomainSet;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let (set, stats) = DomainSet::parse(&text);
    assert!(stats.junk_examples.len() <= 5);
    for line in text.lines().take(50) {
        let _ = set.matches(line.trim());
    }
});
