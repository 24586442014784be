//! Any datagram a client can send to the DNS port: parsed, decided by policy, answered.
//! No upstream is configured, so allowed names end in SERVFAIL without network traffic.
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use portcullis_dns::{BlockResponse, Cache, CacheConfig, DomainSet, Mode, Policy, PolicyTable, Resolver, Upstreams};

fn resolver() -> &'static (Resolver, tokio::runtime::Runtime) {
    static R: OnceLock<(Resolver, tokio::runtime::Runtime)> = OnceLock::new();
    R.get_or_init(|| {
        let (list, _) = DomainSet::parse("||ads.test^\n*.wild.test\n");
        let policy = Arc::new(Policy {
            name: "fuzz".into(),
            mode: Mode::Blocklist,
            lists: vec![("ads".into(), Arc::new(list))],
            allow: DomainSet::new(),
            deny: DomainSet::new(),
            block: BlockResponse::Null,
        });
        let table = PolicyTable { unknown: Some(policy), ..Default::default() };
        let upstreams = Upstreams::new(vec![], std::time::Duration::from_millis(1), 16);
        let r = Resolver::new(table, Arc::new(|_| None), upstreams, Cache::new(CacheConfig::default()));
        let rt = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
        (r, rt)
    })
}

fuzz_target!(|data: &[u8]| {
    let (r, rt) = resolver();
    let src = std::net::IpAddr::from([127, 0, 0, 1]);
    if let Some(out) = rt.block_on(r.answer(data, src, true)) {
        assert!(out.len() <= 1232 || data.len() < 12);
    }
});
