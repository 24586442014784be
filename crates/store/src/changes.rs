//! The store's announcements of the writes that authentication and policy depend on.

use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::watch;

/// A generation number moved by every announced write, and a channel carrying it.
///
/// Readers on the hot path compare [`Changes::generation`] (one atomic load) with the
/// generation their cached answer was made under; listeners that keep a view of the
/// registry wait on [`Changes::subscribe`] and rebuild when it moves.
#[derive(Debug)]
pub struct Changes {
    generation: AtomicU64,
    tx: watch::Sender<u64>,
}

impl Default for Changes {
    fn default() -> Self {
        Self { generation: AtomicU64::new(0), tx: watch::channel(0).0 }
    }
}

impl Changes {
    /// The current generation.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// A receiver that sees every later generation (possibly several at once).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.tx.subscribe()
    }

    /// Announces a committed write. Stores call this; so may a store that learns of
    /// another node's write.
    pub fn announce(&self) {
        let g = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
        self.tx.send_replace(g);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn announcements_move_the_generation_and_wake_subscribers() {
        let changes = Changes::default();
        let mut rx = changes.subscribe();
        assert_eq!(changes.generation(), 0);
        changes.announce();
        changes.announce();
        assert_eq!(changes.generation(), 2);
        rx.changed().await.unwrap();
        assert_eq!(*rx.borrow_and_update(), 2);
    }
}
