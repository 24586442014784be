//! The background tasks a capability owns, and how they stop.
//!
//! Every capability service (`portcullis_dns::Dns`, the firmware repository,
//! the CA's CRL, the device port) is started with a shutdown signal and hands back its
//! [`Tasks`]; the binary waits on them after it signalled shutdown. The periodic jobs
//! (CRL re-signing, firmware metadata refresh, list refresh) are one [`Tasks::every`].

use std::future::Future;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

/// The shutdown signal: `true` (or the sender dropped) means stop.
pub type Shutdown = watch::Receiver<bool>;

/// A shutdown signal and the receiver every service is started with.
pub fn shutdown() -> (watch::Sender<bool>, Shutdown) {
    watch::channel(false)
}

/// Resolves once shutdown is signalled (or its sender is gone).
pub async fn stopped(stop: &mut Shutdown) {
    while !*stop.borrow_and_update() {
        if stop.changed().await.is_err() {
            return;
        }
    }
}

/// When the first run of a periodic job happens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum First {
    /// At once, then every period.
    Now,
    /// After one period.
    AfterPeriod,
}

/// Tasks that end when their shutdown signal fires.
#[derive(Debug, Default)]
pub struct Tasks(Vec<JoinHandle<()>>);

impl Tasks {
    /// No tasks.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a task that watches the shutdown signal itself.
    pub fn spawn(&mut self, task: impl Future<Output = ()> + Send + 'static) {
        self.0.push(tokio::spawn(task));
    }

    /// Adds an already spawned task.
    pub fn push(&mut self, task: JoinHandle<()>) {
        self.0.push(task);
    }

    /// Runs `job` every `period` until shutdown; a job in progress finishes first.
    pub fn every<F, Fut>(&mut self, period: Duration, first: First, mut stop: Shutdown, mut job: F)
    where
        F: FnMut() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send,
    {
        self.spawn(async move {
            if first == First::AfterPeriod {
                tokio::select! {
                    _ = tokio::time::sleep(period) => {}
                    _ = stopped(&mut stop) => return,
                }
            }
            loop {
                job().await;
                tokio::select! {
                    _ = tokio::time::sleep(period) => {}
                    _ = stopped(&mut stop) => return,
                }
            }
        });
    }

    /// Takes over another service's tasks.
    pub fn extend(&mut self, other: Tasks) {
        self.0.extend(other.0);
    }

    /// Waits for every task to end (a task that panicked is logged, not propagated).
    pub async fn join(self) {
        for t in self.0 {
            if let Err(e) = t.await
                && e.is_panic()
            {
                tracing::error!(error = %e, "background task panicked");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test(start_paused = true)]
    async fn every_runs_on_schedule_and_stops() {
        let (tx, rx) = shutdown();
        let now = Arc::new(AtomicU32::new(0));
        let later = Arc::new(AtomicU32::new(0));
        let mut tasks = Tasks::new();
        for (n, first) in [(now.clone(), First::Now), (later.clone(), First::AfterPeriod)] {
            tasks.every(Duration::from_secs(10), first, rx.clone(), move || {
                let n = n.clone();
                async move {
                    n.fetch_add(1, Ordering::SeqCst);
                }
            });
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!((now.load(Ordering::SeqCst), later.load(Ordering::SeqCst)), (1, 0));
        tokio::time::sleep(Duration::from_secs(25)).await;
        assert_eq!((now.load(Ordering::SeqCst), later.load(Ordering::SeqCst)), (3, 2));
        tx.send(true).unwrap();
        tasks.join().await;
        tokio::time::sleep(Duration::from_secs(100)).await;
        assert_eq!(now.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn stopped_sees_a_signal_sent_before_it_waits() {
        let (tx, mut rx) = shutdown();
        tx.send(true).unwrap();
        stopped(&mut rx).await;
    }
}
