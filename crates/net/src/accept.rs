//! The accept loop every TCP listener shares.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::conns::{Conns, Slot};

/// The next connection on `listener` that `admit` lets through and the admission table
/// `conns` admits, with its slot; `None` once `shutdown` turns true.
///
/// Connections are accepted at once, always: one that `admit` refuses (a per-address
/// handshake rate, say) or that is over the table's caps is closed here, counted by the
/// table, instead of waiting in the kernel's accept queue where it would hold up
/// everyone behind it. An accept error (EMFILE and friends) backs off 50 ms instead of
/// spinning. `listener_name` names the listener in logs.
pub async fn next_admitted(
    listener: &TcpListener,
    conns: &Arc<Conns>,
    shutdown: &mut watch::Receiver<bool>,
    listener_name: &'static str,
    mut admit: impl FnMut(SocketAddr) -> bool,
) -> Option<(TcpStream, SocketAddr, Slot)> {
    loop {
        if *shutdown.borrow() {
            return None;
        }
        let (tcp, remote) = tokio::select! {
            r = listener.accept() => match r {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(listener = listener_name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return None,
        };
        if !admit(remote) {
            continue;
        }
        match conns.admit(remote.ip()) {
            Ok(slot) => return Some((tcp, remote, slot)),
            Err(why) => {
                tracing::debug!(listener = listener_name, peer = %remote, reason = why.label(),
                    "connection refused at the cap");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conns::{ConnLimits, ConnMetrics};

    #[tokio::test]
    async fn refused_connections_are_closed_at_once_and_shutdown_ends_the_loop() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let conns = Conns::new("test", ConnLimits { max: 10, per_ip: 1 }, ConnMetrics::default());
        let (stop_tx, mut stop) = watch::channel(false);
        let first = TcpStream::connect(addr).await.unwrap();
        let (_, _, slot) = next_admitted(&listener, &conns, &mut stop, "test", |_| true).await.unwrap();
        // The second from the same address is over its cap: closed, and the loop waits on.
        let mut second = TcpStream::connect(addr).await.unwrap();
        let waiting = next_admitted(&listener, &conns, &mut stop, "test", |_| true);
        tokio::pin!(waiting);
        tokio::select! {
            _ = &mut waiting => panic!("admitted over the per-address cap"),
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
        let mut buf = [0u8; 1];
        let n = tokio::time::timeout(
            Duration::from_secs(2),
            tokio::io::AsyncReadExt::read(&mut second, &mut buf),
        )
        .await
        .expect("the refused connection was not closed");
        assert!(matches!(n, Ok(0) | Err(_)));
        stop_tx.send(true).unwrap();
        assert!(waiting.await.is_none());
        drop((first, slot));
    }
}
