//! What an upstream sends back: the response head (status line, fields, interim 1xx
//! responses) and the body in whatever framing the head declares (Content-Length,
//! chunked with extensions and trailers, until close), fed to the parser in pieces of
//! every size. It must never panic, whatever the bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Layout: [step] [flags] bytes...
    let [step, flags, rest @ ..] = data else { return };
    let _ = portcullis_gateway::parse_response_for_fuzzing(rest, usize::from(*step), flags & 1 == 1);
});
