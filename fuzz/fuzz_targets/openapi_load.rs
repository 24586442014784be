//! The OpenAPI loader on arbitrary documents (YAML or JSON): parsing, 3.0 rewriting,
//! `$ref` resolution and schema compilation. Operators load documents from backend
//! teams; a malformed one must be refused with an error, never panic or hang.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis_gateway::openapi::{Spec, SpecOptions};

fuzz_target!(|data: &[u8]| {
    let _ = Spec::load(data, &SpecOptions::default());
});
