//! Just enough SSH (RFC 4253/4252) to ask one question: does this server accept this
//! password? Key exchange curve25519-sha256 (RFC 8731), cipher chacha20-poly1305@openssh.com,
//! Ed25519 host keys verified; all from ring, the tree's one crypto provider (an SSH crate
//! would bring a second one). The client never opens a channel: after the answer to its
//! one `userauth` request it disconnects. The server half exists for the simulated
//! devices of the tests and demos.

use std::io;
use std::time::Duration;

use ring::aead::chacha20_poly1305_openssh::{KEY_LEN, OpeningKey, SealingKey, TAG_LEN};
use ring::agreement::{self, EphemeralPrivateKey, UnparsedPublicKey, X25519};
use ring::digest::{Context, SHA256};
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

const MSG_DISCONNECT: u8 = 1;
const MSG_IGNORE: u8 = 2;
const MSG_UNIMPLEMENTED: u8 = 3;
const MSG_DEBUG: u8 = 4;
const MSG_SERVICE_REQUEST: u8 = 5;
const MSG_SERVICE_ACCEPT: u8 = 6;
const MSG_EXT_INFO: u8 = 7;
const MSG_KEXINIT: u8 = 20;
const MSG_NEWKEYS: u8 = 21;
const MSG_KEX_ECDH_INIT: u8 = 30;
const MSG_KEX_ECDH_REPLY: u8 = 31;
const MSG_USERAUTH_REQUEST: u8 = 50;
const MSG_USERAUTH_FAILURE: u8 = 51;
const MSG_USERAUTH_SUCCESS: u8 = 52;
const MSG_USERAUTH_BANNER: u8 = 53;
const MSG_USERAUTH_PASSWD_CHANGEREQ: u8 = 60;

const KEX: &str = "curve25519-sha256,curve25519-sha256@libssh.org";
const HOST_KEY: &str = "ssh-ed25519";
const CIPHER: &str = "chacha20-poly1305@openssh.com";
/// Largest packet accepted (RFC 4253 6.1 requires 35,000).
const MAX_PACKET: usize = 64 * 1024;
const CLIENT_VERSION: &str = "SSH-2.0-portcullis_audit";

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// SSH wire encoding.
#[derive(Default)]
struct Buf(Vec<u8>);

impl Buf {
    fn byte(&mut self, b: u8) -> &mut Self {
        self.0.push(b);
        self
    }
    fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend(v.to_be_bytes());
        self
    }
    fn string(&mut self, s: &[u8]) -> &mut Self {
        self.u32(s.len() as u32);
        self.0.extend(s);
        self
    }
    fn mpint(&mut self, n: &[u8]) -> &mut Self {
        let n = &n[n.iter().position(|b| *b != 0).unwrap_or(n.len())..];
        if n.first().is_some_and(|b| b & 0x80 != 0) {
            self.u32(n.len() as u32 + 1).byte(0);
            self.0.extend(n);
            self
        } else {
            self.string(n)
        }
    }
}

/// Reading SSH wire encoding; every read is bounds-checked.
struct Rd<'a>(&'a [u8]);

impl<'a> Rd<'a> {
    fn byte(&mut self) -> io::Result<u8> {
        let (b, rest) = self.0.split_first().ok_or_else(|| bad("truncated SSH message"))?;
        self.0 = rest;
        Ok(*b)
    }
    fn u32(&mut self) -> io::Result<u32> {
        let (b, rest) = self.0.split_first_chunk::<4>().ok_or_else(|| bad("truncated SSH message"))?;
        self.0 = rest;
        Ok(u32::from_be_bytes(*b))
    }
    fn string(&mut self) -> io::Result<&'a [u8]> {
        let n = self.u32()? as usize;
        if n > self.0.len() {
            return Err(bad("SSH string longer than its message"));
        }
        let (s, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(s)
    }
    fn skip(&mut self, n: usize) -> io::Result<()> {
        if n > self.0.len() {
            return Err(bad("truncated SSH message"));
        }
        self.0 = &self.0[n..];
        Ok(())
    }
}

fn names(list: &[u8]) -> Vec<&str> {
    std::str::from_utf8(list).unwrap_or("").split(',').filter(|s| !s.is_empty()).collect()
}

/// The algorithm lists of a KEXINIT payload: kex, host key, cipher c2s, cipher s2c.
fn kexinit_lists(payload: &[u8]) -> io::Result<[Vec<&str>; 4]> {
    let mut r = Rd(payload);
    if r.byte()? != MSG_KEXINIT {
        return Err(bad("expected KEXINIT"));
    }
    r.skip(16)?;
    let kex = names(r.string()?);
    let hk = names(r.string()?);
    let c2s = names(r.string()?);
    let s2c = names(r.string()?);
    Ok([kex, hk, c2s, s2c])
}

/// Parses a KEXINIT and says whether we can talk to its sender (fuzzed).
pub fn check_kexinit(payload: &[u8]) -> Result<(), String> {
    let [kex, hk, c2s, s2c] = kexinit_lists(payload).map_err(|e| e.to_string())?;
    let has = |l: &[&str], want: &str| want.split(',').any(|w| l.contains(&w));
    if !has(&kex, KEX) {
        return Err(format!("no common key exchange (peer offers {})", kex.join(",")));
    }
    if !has(&hk, HOST_KEY) {
        return Err(format!("no common host key type (peer offers {})", hk.join(",")));
    }
    if !has(&c2s, CIPHER) || !has(&s2c, CIPHER) {
        return Err(format!("no common cipher (peer offers {})", c2s.join(",")));
    }
    Ok(())
}

fn kexinit(rng: &SystemRandom) -> io::Result<Vec<u8>> {
    let mut cookie = [0u8; 16];
    rng.fill(&mut cookie).map_err(|_| bad("no randomness"))?;
    let mut b = Buf::default();
    b.byte(MSG_KEXINIT);
    b.0.extend(cookie);
    for list in [KEX, HOST_KEY, CIPHER, CIPHER, "hmac-sha2-256", "hmac-sha2-256", "none", "none", "", ""] {
        b.string(list.as_bytes());
    }
    b.byte(0).u32(0);
    Ok(b.0)
}

/// The binary packet protocol over a stream, encrypted after NEWKEYS.
struct Transport<S> {
    s: S,
    seq_in: u32,
    seq_out: u32,
    seal: Option<SealingKey>,
    open: Option<OpeningKey>,
    rng: SystemRandom,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Transport<S> {
    async fn send(&mut self, payload: &[u8]) -> io::Result<()> {
        // padding_length byte + payload + padding: a multiple of 8 (without the length
        // field when encrypted, as chacha20-poly1305@openssh.com defines), padding ≥ 4.
        let base = if self.seal.is_some() { 1 + payload.len() } else { 5 + payload.len() };
        let mut pad = 8 - base % 8;
        if pad < 4 {
            pad += 8;
        }
        let len = 1 + payload.len() + pad;
        let mut pkt = Vec::with_capacity(4 + len + TAG_LEN);
        pkt.extend((len as u32).to_be_bytes());
        pkt.push(pad as u8);
        pkt.extend(payload);
        let mut padding = vec![0u8; pad];
        self.rng.fill(&mut padding).map_err(|_| bad("no randomness"))?;
        pkt.extend(padding);
        if let Some(k) = &self.seal {
            let mut tag = [0u8; TAG_LEN];
            k.seal_in_place(self.seq_out, &mut pkt, &mut tag);
            pkt.extend(tag);
        }
        self.seq_out = self.seq_out.wrapping_add(1);
        self.s.write_all(&pkt).await
    }

    async fn recv(&mut self) -> io::Result<Vec<u8>> {
        loop {
            let mut len = [0u8; 4];
            self.s.read_exact(&mut len).await?;
            let plain_len = match &self.open {
                Some(k) => k.decrypt_packet_length(self.seq_in, len),
                None => len,
            };
            let n = u32::from_be_bytes(plain_len) as usize;
            if !(5..=MAX_PACKET).contains(&n) {
                return Err(bad(format!("SSH packet length {n} out of range")));
            }
            let extra = if self.open.is_some() { TAG_LEN } else { 0 };
            let mut pkt = vec![0u8; 4 + n + extra];
            pkt[..4].copy_from_slice(&len);
            self.s.read_exact(&mut pkt[4..]).await?;
            let body: Vec<u8> = match &self.open {
                Some(k) => {
                    let (data, tag) = pkt.split_at_mut(4 + n);
                    let tag: [u8; TAG_LEN] = tag.try_into().map_err(|_| bad("SSH tag"))?;
                    k.open_in_place(self.seq_in, data, &tag)
                        .map_err(|_| bad("SSH packet failed authentication"))?
                        .to_vec()
                }
                None => pkt[4..].to_vec(),
            };
            self.seq_in = self.seq_in.wrapping_add(1);
            let pad = usize::from(*body.first().ok_or_else(|| bad("empty SSH packet"))?);
            if pad + 1 > body.len() {
                return Err(bad("SSH padding longer than the packet"));
            }
            let payload = body[1..body.len() - pad].to_vec();
            match payload.first() {
                Some(&(MSG_IGNORE | MSG_DEBUG | MSG_UNIMPLEMENTED | MSG_EXT_INFO)) => continue,
                Some(&MSG_DISCONNECT) => {
                    let mut r = Rd(&payload[1..]);
                    let _code = r.u32().unwrap_or(0);
                    let why = r.string().map(|s| String::from_utf8_lossy(s).into_owned()).unwrap_or_default();
                    return Err(io::Error::new(
                        io::ErrorKind::ConnectionAborted,
                        format!("SSH disconnect: {why}"),
                    ));
                }
                None => return Err(bad("empty SSH payload")),
                _ => return Ok(payload),
            }
        }
    }
}

async fn read_version<S: AsyncRead + Unpin>(s: &mut S) -> io::Result<Vec<u8>> {
    // Servers may send other lines before the version (RFC 4253 4.2).
    for _ in 0..16 {
        let mut line = Vec::new();
        let mut b = [0u8; 1];
        while line.len() < 255 {
            s.read_exact(&mut b).await?;
            if b[0] == b'\n' {
                break;
            }
            line.push(b[0]);
        }
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        if line.starts_with(b"SSH-") {
            if !line.starts_with(b"SSH-2.0-") && !line.starts_with(b"SSH-1.99-") {
                return Err(bad(format!("SSH protocol {} not supported", String::from_utf8_lossy(&line))));
            }
            return Ok(line);
        }
    }
    Err(bad("no SSH version line"))
}

fn derive(k: &[u8], h: &[u8], letter: u8, session: &[u8]) -> [u8; KEY_LEN] {
    let mut kb = Buf::default();
    kb.mpint(k);
    let mut c = Context::new(&SHA256);
    c.update(&kb.0);
    c.update(h);
    c.update(&[letter]);
    c.update(session);
    let k1 = c.finish();
    let mut c = Context::new(&SHA256);
    c.update(&kb.0);
    c.update(h);
    c.update(k1.as_ref());
    let k2 = c.finish();
    let mut out = [0u8; KEY_LEN];
    out[..32].copy_from_slice(k1.as_ref());
    out[32..].copy_from_slice(k2.as_ref());
    out
}

#[allow(clippy::too_many_arguments)]
fn exchange_hash(
    vc: &[u8],
    vs: &[u8],
    ic: &[u8],
    is: &[u8],
    ks: &[u8],
    qc: &[u8],
    qs: &[u8],
    k: &[u8],
) -> Vec<u8> {
    let mut b = Buf::default();
    b.string(vc).string(vs).string(ic).string(is).string(ks).string(qc).string(qs).mpint(k);
    ring::digest::digest(&SHA256, &b.0).as_ref().to_vec()
}

fn x25519(rng: &SystemRandom) -> io::Result<(EphemeralPrivateKey, Vec<u8>)> {
    let key = EphemeralPrivateKey::generate(&X25519, rng).map_err(|_| bad("no randomness"))?;
    let public = key.compute_public_key().map_err(|_| bad("x25519"))?.as_ref().to_vec();
    Ok((key, public))
}

fn agree(key: EphemeralPrivateKey, peer: &[u8]) -> io::Result<Vec<u8>> {
    agreement::agree_ephemeral(key, &UnparsedPublicKey::new(&X25519, peer), |k| k.to_vec())
        .map_err(|_| bad("key agreement failed (bad peer key)"))
}

/// What a server said to a password.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PasswordAnswer {
    /// Logged in (or accepted and told to change it).
    Accepted,
    /// Refused; `password_offered` is false when the server does not take passwords.
    Refused {
        /// Whether `password` is among the methods the server still offers.
        password_offered: bool,
    },
}

/// Client: one password attempt for `user`. `Err` for anything that is not an answer
/// (no common algorithms, bad host key signature, timeouts).
pub async fn try_password<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    user: &str,
    password: &str,
    timeout: Duration,
) -> io::Result<PasswordAnswer> {
    tokio::time::timeout(timeout, async {
        s.write_all(format!("{CLIENT_VERSION}\r\n").as_bytes()).await?;
        let vs = read_version(&mut s).await?;
        let rng = SystemRandom::new();
        let mut t = Transport { s, seq_in: 0, seq_out: 0, seal: None, open: None, rng };
        let ic = kexinit(&t.rng)?;
        t.send(&ic).await?;
        let is = t.recv().await?;
        check_kexinit(&is).map_err(bad)?;
        let (eph, qc) = x25519(&t.rng)?;
        let mut init = Buf::default();
        init.byte(MSG_KEX_ECDH_INIT).string(&qc);
        t.send(&init.0).await?;
        let reply = t.recv().await?;
        let mut r = Rd(&reply);
        if r.byte()? != MSG_KEX_ECDH_REPLY {
            return Err(bad("expected KEX_ECDH_REPLY"));
        }
        let ks = r.string()?.to_vec();
        let qs = r.string()?.to_vec();
        let sig = r.string()?.to_vec();
        let k = agree(eph, &qs)?;
        let h = exchange_hash(CLIENT_VERSION.as_bytes(), &vs, &ic, &is, &ks, &qc, &qs, &k);
        // The server proves it holds the host key by signing H.
        let mut kr = Rd(&ks);
        let (kt, pk) = (kr.string()?, kr.string()?);
        let mut sr = Rd(&sig);
        let (st, sv) = (sr.string()?, sr.string()?);
        if kt != HOST_KEY.as_bytes() || st != HOST_KEY.as_bytes() {
            return Err(bad("host key is not ssh-ed25519"));
        }
        ring::signature::UnparsedPublicKey::new(&ED25519, pk)
            .verify(&h, sv)
            .map_err(|_| bad("host key signature does not verify"))?;
        t.send(&[MSG_NEWKEYS]).await?;
        if t.recv().await?.first() != Some(&MSG_NEWKEYS) {
            return Err(bad("expected NEWKEYS"));
        }
        t.seal = Some(SealingKey::new(&derive(&k, &h, b'C', &h)));
        t.open = Some(OpeningKey::new(&derive(&k, &h, b'D', &h)));
        let mut req = Buf::default();
        req.byte(MSG_SERVICE_REQUEST).string(b"ssh-userauth");
        t.send(&req.0).await?;
        if t.recv().await?.first() != Some(&MSG_SERVICE_ACCEPT) {
            return Err(bad("ssh-userauth refused"));
        }
        let mut auth = Buf::default();
        auth.byte(MSG_USERAUTH_REQUEST)
            .string(user.as_bytes())
            .string(b"ssh-connection")
            .string(b"password")
            .byte(0)
            .string(password.as_bytes());
        t.send(&auth.0).await?;
        loop {
            let m = t.recv().await?;
            match m.first() {
                Some(&MSG_USERAUTH_BANNER) => continue,
                Some(&(MSG_USERAUTH_SUCCESS | MSG_USERAUTH_PASSWD_CHANGEREQ)) => {
                    // Nothing more: no channel, no command. Say goodbye.
                    let mut bye = Buf::default();
                    bye.byte(MSG_DISCONNECT).u32(11).string(b"audit done").string(b"");
                    let _ = t.send(&bye.0).await;
                    return Ok(PasswordAnswer::Accepted);
                }
                Some(&MSG_USERAUTH_FAILURE) => {
                    let methods = Rd(&m[1..]).string().map(names).unwrap_or_default();
                    return Ok(PasswordAnswer::Refused { password_offered: methods.contains(&"password") });
                }
                _ => return Err(bad("unexpected answer to userauth")),
            }
        }
    })
    .await
    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "SSH exchange timed out"))?
}

/// Server: a host that takes one user/password pair (simulated devices only).
pub async fn serve_password<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    host_key: &Ed25519KeyPair,
    user: &str,
    password: &str,
) -> io::Result<()> {
    let version = "SSH-2.0-dropbear_2019.78";
    s.write_all(format!("{version}\r\n").as_bytes()).await?;
    let vc = read_version(&mut s).await?;
    let rng = SystemRandom::new();
    let mut t = Transport { s, seq_in: 0, seq_out: 0, seal: None, open: None, rng };
    let is = kexinit(&t.rng)?;
    t.send(&is).await?;
    let ic = t.recv().await?;
    check_kexinit(&ic).map_err(bad)?;
    let init = t.recv().await?;
    let mut r = Rd(&init);
    if r.byte()? != MSG_KEX_ECDH_INIT {
        return Err(bad("expected KEX_ECDH_INIT"));
    }
    let qc = r.string()?.to_vec();
    let (eph, qs) = x25519(&t.rng)?;
    let k = agree(eph, &qc)?;
    let mut ks = Buf::default();
    ks.string(HOST_KEY.as_bytes()).string(host_key.public_key().as_ref());
    let h = exchange_hash(&vc, version.as_bytes(), &ic, &is, &ks.0, &qc, &qs, &k);
    let mut sig = Buf::default();
    sig.string(HOST_KEY.as_bytes()).string(host_key.sign(&h).as_ref());
    let mut reply = Buf::default();
    reply.byte(MSG_KEX_ECDH_REPLY).string(&ks.0).string(&qs).string(&sig.0);
    t.send(&reply.0).await?;
    t.send(&[MSG_NEWKEYS]).await?;
    if t.recv().await?.first() != Some(&MSG_NEWKEYS) {
        return Err(bad("expected NEWKEYS"));
    }
    t.seal = Some(SealingKey::new(&derive(&k, &h, b'D', &h)));
    t.open = Some(OpeningKey::new(&derive(&k, &h, b'C', &h)));
    let req = t.recv().await?;
    if req.first() != Some(&MSG_SERVICE_REQUEST) {
        return Err(bad("expected SERVICE_REQUEST"));
    }
    let mut ok = Buf::default();
    ok.byte(MSG_SERVICE_ACCEPT).string(b"ssh-userauth");
    t.send(&ok.0).await?;
    for _ in 0..6 {
        let m = t.recv().await?;
        let mut r = Rd(&m);
        if r.byte()? != MSG_USERAUTH_REQUEST {
            return Err(bad("expected USERAUTH_REQUEST"));
        }
        let (u, _service, method) = (r.string()?.to_vec(), r.string()?, r.string()?.to_vec());
        let accepted = method == b"password" && {
            let _change = r.byte()?;
            let p = r.string()?;
            u == user.as_bytes() && p == password.as_bytes()
        };
        if accepted {
            t.send(&[MSG_USERAUTH_SUCCESS]).await?;
            // A shell would start here; the audit never asks for one.
            let _ = t.recv().await;
            return Ok(());
        }
        let mut fail = Buf::default();
        fail.byte(MSG_USERAUTH_FAILURE).string(b"publickey,password").byte(0);
        t.send(&fail.0).await?;
    }
    Ok(())
}

/// A fresh Ed25519 host key (simulated devices).
pub fn host_key() -> Ed25519KeyPair {
    let rng = SystemRandom::new();
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).expect("ring generates Ed25519 keys");
    Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).expect("a key ring just made parses")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_client_and_the_simulated_server_agree_on_passwords() {
        for (pw, want) in [
            ("xc3511", PasswordAnswer::Accepted),
            ("nope", PasswordAnswer::Refused { password_offered: true }),
        ] {
            let (c, s) = tokio::io::duplex(64 * 1024);
            let key = host_key();
            let server = tokio::spawn(async move { serve_password(s, &key, "root", "xc3511").await });
            let got = try_password(c, "root", pw, Duration::from_secs(5)).await.unwrap();
            assert_eq!(got, want);
            drop(server);
        }
    }

    #[test]
    fn kexinit_junk_is_an_error() {
        assert!(check_kexinit(&[]).is_err());
        assert!(check_kexinit(&[MSG_KEXINIT; 40]).is_err());
        let mut old = Buf::default();
        old.byte(MSG_KEXINIT);
        old.0.extend([0; 16]);
        for l in ["diffie-hellman-group1-sha1", "ssh-rsa", "aes128-cbc", "aes128-cbc"] {
            old.string(l.as_bytes());
        }
        assert!(check_kexinit(&old.0).unwrap_err().contains("no common key exchange"));
    }
}
