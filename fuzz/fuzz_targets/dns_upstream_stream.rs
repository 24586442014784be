//! What a DNS-over-TCP/TLS upstream sends back while queries are pipelined to it: any
//! bytes, framed or not, answers with made-up ids, truncated frames. The pipeline must
//! never panic or hang, and never hand a query a frame that is not its own.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    portcullis_dns::pipeline_for_fuzzing(data);
});
