//! Pure parsers and encoders for what devices say back. Everything here takes untrusted
//! bytes, so it never panics and never allocates more than its input (fuzzed:
//! `fuzz/fuzz_targets/audit_wire.rs`).

/// What a banner (the first bytes a service sends unprompted) says it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Banner {
    /// `SSH-2.0-…`
    Ssh,
    /// Telnet option negotiation or a login prompt.
    Telnet,
    /// `220 … FTP`
    Ftp,
    /// `220` from something else (SMTP and friends).
    Smtp,
    /// Anything else.
    Unknown,
}

/// Classifies the first bytes a service sent.
pub fn classify_banner(b: &[u8], port: u16) -> Banner {
    if b.starts_with(b"SSH-") {
        return Banner::Ssh;
    }
    if b.windows(2).any(|w| w[0] == 0xff && (0xfb..=0xfe).contains(&w[1])) {
        return Banner::Telnet;
    }
    let text = String::from_utf8_lossy(&b[..b.len().min(512)]).to_ascii_lowercase();
    if text.starts_with("220") {
        return if text.contains("ftp") || port == 21 { Banner::Ftp } else { Banner::Smtp };
    }
    let t = text.trim_end();
    if t.ends_with("login:") || t.ends_with("username:") || t.ends_with("user:") {
        return Banner::Telnet;
    }
    Banner::Unknown
}

/// A printable, bounded rendering of a banner for evidence.
pub fn printable(b: &[u8]) -> String {
    let mut s: String = b
        .iter()
        .filter(|&&c| c != 0xff && !(0xf0..=0xfe).contains(&c))
        .map(|&c| if (0x20..0x7f).contains(&c) { c as char } else { ' ' })
        .collect();
    s = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if s.len() > 80 {
        s.truncate(77);
        s.push_str("...");
    }
    s
}

/// Splits telnet input into text and the replies our side owes: every option the server
/// offers or asks for is refused (`DONT`/`WONT`), so no terminal features are turned on.
pub fn telnet_filter(input: &[u8], text: &mut Vec<u8>, reply: &mut Vec<u8>) {
    const IAC: u8 = 0xff;
    let mut i = 0;
    while i < input.len() {
        let b = input[i];
        if b != IAC {
            if b != 0 {
                text.push(b);
            }
            i += 1;
            continue;
        }
        match input.get(i + 1) {
            Some(&cmd @ (0xfb..=0xfe)) => {
                if let Some(&opt) = input.get(i + 2) {
                    // WILL -> DONT, DO -> WONT; WONT/DONT need no answer.
                    match cmd {
                        0xfb => reply.extend([IAC, 0xfe, opt]),
                        0xfd => reply.extend([IAC, 0xfc, opt]),
                        _ => {}
                    }
                }
                i += 3;
            }
            Some(0xfa) => {
                // Subnegotiation: skip to IAC SE.
                let end = input[i + 2..].windows(2).position(|w| w == [IAC, 0xf0]);
                i = end.map_or(input.len(), |e| i + 2 + e + 2);
            }
            Some(&IAC) => {
                text.push(IAC);
                i += 2;
            }
            Some(_) => i += 2,
            None => i += 1,
        }
    }
}

/// What a telnet service's text after a password says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoginOutcome {
    /// A shell prompt or a welcome: logged in.
    Accepted,
    /// Refused, or asked again.
    Refused,
    /// Not decided yet.
    Pending,
}

/// Reads a telnet reply to a password.
pub fn telnet_outcome(text: &[u8]) -> LoginOutcome {
    let t = String::from_utf8_lossy(text).to_ascii_lowercase();
    let t = t.trim_end();
    let refused =
        ["incorrect", "failed", "denied", "invalid", "bad password", "wrong", "login:", "username:"];
    if refused.iter().any(|w| t.contains(w)) {
        return LoginOutcome::Refused;
    }
    if t.ends_with('#') || t.ends_with('$') || t.ends_with('>') || t.ends_with('%') || t.contains("busybox") {
        return LoginOutcome::Accepted;
    }
    LoginOutcome::Pending
}

/// An MQTT 3.1.1 CONNECT packet (clean session, keep-alive 30 s).
pub fn mqtt_connect(client_id: &str, login: Option<(&str, &str)>) -> Vec<u8> {
    let mut body = Vec::with_capacity(64);
    body.extend([0, 4]);
    body.extend(b"MQTT");
    body.push(4);
    let mut flags = 0x02;
    if login.is_some() {
        flags |= 0xc0;
    }
    body.push(flags);
    body.extend(30u16.to_be_bytes());
    let mut field = |s: &str| {
        let s = &s.as_bytes()[..s.len().min(0xffff)];
        body.extend((s.len() as u16).to_be_bytes());
        body.extend(s);
    };
    field(client_id);
    if let Some((u, p)) = login {
        field(u);
        field(p);
    }
    let mut out = vec![0x10];
    let mut len = body.len();
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if len == 0 {
            break;
        }
    }
    out.extend(body);
    out
}

/// The return code of an MQTT CONNACK, if `b` starts with one.
pub fn mqtt_connack(b: &[u8]) -> Option<u8> {
    match b {
        [0x20, 0x02, _flags, rc, ..] => Some(*rc),
        _ => None,
    }
}

/// A TLS 1.1 ClientHello offering only pre-1.2 versions and classic suites, to ask a
/// server whether it still accepts them. rustls cannot speak TLS < 1.2 by design, so
/// this one message is built by hand.
pub fn legacy_client_hello(random: [u8; 32]) -> Vec<u8> {
    let suites: &[u16] = &[0xc013, 0xc014, 0xc009, 0xc00a, 0x002f, 0x0035, 0x000a, 0x0005];
    let mut hello = vec![0x03, 0x02];
    hello.extend(random);
    hello.push(0);
    hello.extend(((suites.len() * 2) as u16).to_be_bytes());
    for s in suites {
        hello.extend(s.to_be_bytes());
    }
    hello.extend([1, 0]);
    let ext: &[u8] = &[
        0x00, 0x0a, 0x00, 0x08, 0x00, 0x06, 0x00, 0x17, 0x00, 0x18, 0x00, 0x1d, // groups
        0x00, 0x0b, 0x00, 0x02, 0x01, 0x00, // point formats
        0xff, 0x01, 0x00, 0x01, 0x00, // renegotiation_info
    ];
    hello.extend((ext.len() as u16).to_be_bytes());
    hello.extend(ext);
    let mut hs = vec![0x01, 0, (hello.len() >> 8) as u8, hello.len() as u8];
    hs.extend(hello);
    let mut rec = vec![0x16, 0x03, 0x01];
    rec.extend((hs.len() as u16).to_be_bytes());
    rec.extend(hs);
    rec
}

/// What the server answered to [`legacy_client_hello`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LegacyAnswer {
    /// A ServerHello choosing this protocol version.
    ServerHello(u16),
    /// A TLS alert: refused.
    Alert,
    /// Need more bytes.
    Incomplete,
    /// Not TLS.
    NotTls,
}

/// Parses the first record of a server's answer.
pub fn parse_server_hello(b: &[u8]) -> LegacyAnswer {
    if b.len() < 5 {
        return LegacyAnswer::Incomplete;
    }
    if b[1] != 0x03 {
        return LegacyAnswer::NotTls;
    }
    match b[0] {
        0x15 => LegacyAnswer::Alert,
        0x16 => {
            // record(5) + type(1) + len(3) + version(2)
            if b.len() < 11 {
                return LegacyAnswer::Incomplete;
            }
            if b[5] != 0x02 {
                return LegacyAnswer::NotTls;
            }
            LegacyAnswer::ServerHello(u16::from_be_bytes([b[9], b[10]]))
        }
        _ => LegacyAnswer::NotTls,
    }
}

/// The name of a TLS protocol version.
pub fn tls_version_name(v: u16) -> &'static str {
    match v {
        0x0300 => "SSL 3.0",
        0x0301 => "TLS 1.0",
        0x0302 => "TLS 1.1",
        0x0303 => "TLS 1.2",
        0x0304 => "TLS 1.3",
        _ => "unknown version",
    }
}

/// A parsed HTTP response head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpHead {
    /// Status code.
    pub status: u16,
    /// `WWW-Authenticate` asks for Basic.
    pub basic_auth: bool,
    /// The realm, if any.
    pub realm: Option<String>,
    /// `Server` header.
    pub server: Option<String>,
}

/// Parses an HTTP (or RTSP) response head; `None` if it is not one (yet).
pub fn parse_http_head(b: &[u8]) -> Option<HttpHead> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    // httparse only knows HTTP/1.x; RTSP/1.0 heads are rewritten for it.
    let owned;
    let b = if b.starts_with(b"RTSP/1.0 ") {
        owned = [b"HTTP/1.0 ", &b[9..]].concat();
        &owned[..]
    } else {
        b
    };
    match resp.parse(b) {
        Ok(httparse::Status::Complete(_)) => {}
        // A truncated head still has its status line.
        Ok(httparse::Status::Partial) | Err(httparse::Error::TooManyHeaders) if resp.code.is_some() => {}
        _ => return None,
    }
    let status = resp.code?;
    let mut head = HttpHead { status, basic_auth: false, realm: None, server: None };
    for h in resp.headers.iter().take_while(|h| !h.name.is_empty()) {
        let v = String::from_utf8_lossy(h.value);
        if h.name.eq_ignore_ascii_case("www-authenticate")
            && v.trim_start().to_ascii_lowercase().starts_with("basic")
        {
            head.basic_auth = true;
            head.realm = v.split_once("realm=").map(|(_, r)| printable(r.trim_matches('"').as_bytes()));
        } else if h.name.eq_ignore_ascii_case("server") {
            head.server = Some(printable(h.value));
        }
    }
    Some(head)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn banners() {
        assert_eq!(classify_banner(b"SSH-2.0-dropbear_2019.78\r\n", 22), Banner::Ssh);
        assert_eq!(classify_banner(&[0xff, 0xfd, 0x18, 0xff, 0xfd, 0x20], 23), Banner::Telnet);
        assert_eq!(classify_banner(b"\r\nDVR login: ", 2323), Banner::Telnet);
        assert_eq!(classify_banner(b"220 (vsFTPd 3.0.3)\r\n", 21), Banner::Ftp);
        assert_eq!(classify_banner(b"220 mail ESMTP\r\n", 25), Banner::Smtp);
        assert_eq!(printable(b"\xff\xfb\x01login:\r\n  x"), "login: x");
    }

    #[test]
    fn telnet_options_are_refused_and_text_kept() {
        let (mut text, mut reply) = (Vec::new(), Vec::new());
        telnet_filter(b"\xff\xfd\x18\xff\xfb\x01\xff\xfa\x18\x01\xff\xf0login: ", &mut text, &mut reply);
        assert_eq!(text, b"login: ");
        assert_eq!(reply, vec![0xff, 0xfc, 0x18, 0xff, 0xfe, 0x01]);
        assert_eq!(telnet_outcome(b"\r\nLogin incorrect\r\nlogin: "), LoginOutcome::Refused);
        assert_eq!(telnet_outcome(b"\r\nBusyBox v1.19\r\n# "), LoginOutcome::Accepted);
        assert_eq!(telnet_outcome(b"\r\n"), LoginOutcome::Pending);
    }

    #[test]
    fn mqtt_and_tls_codecs() {
        let p = mqtt_connect("c", Some(("u", "p")));
        assert_eq!(p[0], 0x10);
        assert_eq!(p[1] as usize, p.len() - 2);
        assert_eq!(mqtt_connack(&[0x20, 2, 0, 5]), Some(5));
        assert_eq!(mqtt_connack(&[0x20, 3, 0, 0]), None);
        let hello = legacy_client_hello([7; 32]);
        assert_eq!(u16::from_be_bytes([hello[3], hello[4]]) as usize, hello.len() - 5);
        let sh = [0x16, 3, 2, 0, 0x4a, 2, 0, 0, 0x46, 3, 2];
        assert_eq!(parse_server_hello(&sh), LegacyAnswer::ServerHello(0x0302));
        assert_eq!(parse_server_hello(&[0x15, 3, 3, 0, 2, 2, 70]), LegacyAnswer::Alert);
        assert_eq!(parse_server_hello(b"HTTP/1.1 400"), LegacyAnswer::NotTls);
    }

    #[test]
    fn http_heads() {
        let h =
            parse_http_head(b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm=\"cam\"\r\n\r\n")
                .unwrap();
        assert_eq!((h.status, h.basic_auth, h.realm.as_deref()), (401, true, Some("cam")));
        assert_eq!(parse_http_head(b"RTSP/1.0 200 OK\r\nCSeq: 1\r\n\r\n").unwrap().status, 200);
        assert!(parse_http_head(b"SSH-2.0-x\r\n").is_none());
    }
}
