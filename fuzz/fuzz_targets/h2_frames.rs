//! The HTTP/2 frame guard between TLS and hyper: what a client sends (preface, frame
//! headers, payloads it skips) and what hyper writes back, cut in pieces of every size
//! and interleaved, with limits low enough that floods, stalls and the GOAWAY written at
//! a frame boundary are all reached. It must never panic, whatever the bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Layout: [step] [split: u16] inbound || outbound
    let [step, a, b, rest @ ..] = data else { return };
    let split = usize::from(u16::from_le_bytes([*a, *b])).min(rest.len());
    let (inbound, outbound) = rest.split_at(split);
    portcullis_gateway::guard_for_fuzzing(inbound, outbound, usize::from(*step));
});
