//! `portcullis-simdevice ADDR[-ADDR] PORT=KIND[:USER:PASSWORD]...` runs simulated devices
//! until interrupted. See the library docs for the kinds.

use std::net::{IpAddr, Ipv4Addr};

use anyhow::{Context, bail};
use portcullis_simdevice::Service;

fn range(spec: &str) -> anyhow::Result<Vec<IpAddr>> {
    let Some((a, b)) = spec.split_once('-') else {
        return Ok(vec![spec.parse().with_context(|| format!("{spec:?} is not an address"))?]);
    };
    let (a, b): (Ipv4Addr, Ipv4Addr) = (a.parse()?, b.parse()?);
    let (a, b) = (u32::from(a), u32::from(b));
    if b < a || b - a > 65_535 {
        bail!("address range {spec} is backwards or larger than 65536");
    }
    Ok((a..=b).map(|x| IpAddr::V4(Ipv4Addr::from(x))).collect())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((addrs, services)) = args.split_first() else {
        bail!("usage: portcullis-simdevice ADDR[-ADDR] PORT=KIND[:USER:PASSWORD]...");
    };
    let services: Vec<Service> = services.iter().map(|s| s.parse()).collect::<anyhow::Result<_>>()?;
    let mut devices = Vec::new();
    for a in range(addrs)? {
        devices.push(portcullis_simdevice::start(a, &services).await?);
    }
    println!("ready: {} simulated device(s), {} service(s) each", devices.len(), services.len());
    tokio::signal::ctrl_c().await?;
    Ok(())
}
