//! Port sets: the built-in IoT list and `--ports` expressions.

/// The default TCP ports, each one that IoT malware scans for or that misconfigured
/// devices are known to leave open.
pub const DEFAULT_TCP: &[(u16, &str)] = &[
    (21, "FTP: plaintext logins, firmware drops"),
    (22, "SSH: brute-forced by Mirai variants and Hajime"),
    (23, "Telnet: Mirai's first target"),
    (53, "DNS over TCP: open resolvers used for amplification"),
    (80, "HTTP admin pages with default Basic-auth passwords"),
    (81, "HTTP on camera/DVR boards (GoAhead), Hajime and Persirai"),
    (443, "HTTPS admin pages"),
    (445, "SMB: NAS firmware, WannaCry-class worms"),
    (502, "Modbus/TCP: unauthenticated industrial control"),
    (554, "RTSP: camera streams, often without authentication"),
    (1023, "Telnet alternative used by Hajime"),
    (1080, "SOCKS proxies left open by botnet loaders"),
    (1883, "MQTT without TLS, often anonymous"),
    (1900, "UPnP HTTP description service"),
    (2000, "Cisco SCCP / MikroTik bandwidth test"),
    (2323, "Telnet alternative scanned by Mirai"),
    (2332, "Telnet alternative on cellular routers"),
    (37215, "Huawei HG532 UPnP (CVE-2017-17215, Satori/Mirai)"),
    (37777, "Dahua DVR service protocol"),
    (4567, "TR-069 alternative on Verizon/Actiontec routers"),
    (5000, "UPnP/HTTP on NAS and routers"),
    (5431, "UPnP (Broadcom) on routers, exploited by IoT botnets"),
    (5555, "Android Debug Bridge: ADB.Miner, Trinity"),
    (5900, "VNC without a password"),
    (6789, "Ubiquiti/Hajime telnet-like service"),
    (7547, "TR-069 CWMP (the 2016 Deutsche Telekom outage)"),
    (8000, "HTTP alternative on Hikvision cameras"),
    (8001, "HTTP alternative on smart TVs"),
    (8008, "HTTP alternative on media devices"),
    (8080, "HTTP proxy/admin alternative"),
    (8081, "HTTP alternative on cameras (Persirai)"),
    (8088, "HTTP alternative on routers"),
    (8443, "HTTPS admin alternative"),
    (8883, "MQTT over TLS"),
    (8888, "HTTP alternative on embedded web servers"),
    (9000, "HTTP alternative (web cams, management)"),
    (9527, "Xiongmai DVR debug console"),
    (9530, "Xiongmai DVR telnet enabler (CVE-2017-16725 era)"),
    (10001, "Ubiquiti discovery / serial-to-TCP bridges"),
    (20000, "DNP3 industrial control"),
    (23231, "Telnet alternative used by Mirai variants"),
    (49152, "UPnP on Realtek SDK and Belkin WeMo"),
    (52869, "Realtek SDK miniigd UPnP (CVE-2014-8361, Satori)"),
    (60001, "Telnet/HTTP on DVRs targeted by Hajime and Mirai variants"),
];

/// The default port list, sorted.
pub fn default_tcp() -> Vec<u16> {
    let mut v: Vec<u16> = DEFAULT_TCP.iter().map(|(p, _)| *p).collect();
    v.sort_unstable();
    v
}

/// Parses `22,80,8000-8100` (or `all` / `1-65535`); `default` is the built-in list.
pub fn parse(expr: &str) -> Result<Vec<u16>, String> {
    let expr = expr.trim();
    if expr.is_empty() || expr == "default" {
        return Ok(default_tcp());
    }
    if expr == "all" {
        return Ok((1..=65535).collect());
    }
    let mut out = Vec::new();
    for part in expr.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let port = |s: &str| -> Result<u16, String> {
            match s.trim().parse::<u32>() {
                Ok(p @ 1..=65535) => Ok(p as u16),
                _ => Err(format!("ports: {s:?} is not a port (1-65535)")),
            }
        };
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (port(a)?, port(b)?);
                if b < a {
                    return Err(format!("ports: range {part:?} runs backwards"));
                }
                out.extend(a..=b);
            }
            None if part == "default" => out.extend(default_tcp()),
            None => out.push(port(part)?),
        }
    }
    out.sort_unstable();
    out.dedup();
    if out.is_empty() {
        return Err("ports: no ports given".into());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_expressions() {
        assert_eq!(parse("80, 22,20-23").unwrap(), vec![20, 21, 22, 23, 80]);
        assert_eq!(parse("1-65535").unwrap().len(), 65535);
        assert!(parse("default").unwrap().contains(&7547));
        for bad in ["0", "65536", "9-3", "x", ",", "80-"] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
