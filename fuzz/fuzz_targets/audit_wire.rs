//! What a probed device sends back (banners, telnet option soup, MQTT CONNACKs, TLS
//! ServerHellos, HTTP/RTSP heads, SSH KEXINITs), and MUD files: untrusted bytes, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis_audit::wire;

fuzz_target!(|data: &[u8]| {
    let port = data.first().map_or(23, |b| u16::from(*b) * 257);
    let _ = wire::classify_banner(data, port);
    let printable = wire::printable(data);
    assert!(printable.len() <= 80);
    let (mut text, mut reply) = (Vec::new(), Vec::new());
    wire::telnet_filter(data, &mut text, &mut reply);
    assert!(text.len() <= data.len());
    assert!(reply.len() <= data.len() * 3);
    let _ = wire::telnet_outcome(&text);
    let _ = wire::mqtt_connack(data);
    let _ = wire::parse_server_hello(data);
    let _ = portcullis_audit::ssh::check_kexinit(data);
    if let Some(head) = wire::parse_http_head(data) {
        assert!(head.realm.as_ref().is_none_or(|r| r.len() <= 80));
    }
    if let Ok(imported) = portcullis_audit::mud::import(data) {
        assert!(imported.profile.tcp.windows(2).all(|w| w[0] < w[1]));
    }
});
