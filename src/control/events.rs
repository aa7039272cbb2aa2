//! The event bus: the daemon publishes from any thread, every `watch`
//! connection receives. A watcher that reads too slowly loses events and
//! is told how many, instead of slowing anyone else down.

use tokio::sync::broadcast;

use super::protocol::{Event, EventKind};

/// Events kept for a slow watcher before it starts losing them. Events are
/// a few hundred bytes and come at human rates except fetch progress,
/// which the server throttles to ten a second per call.
pub const DEFAULT_CAPACITY: usize = 1024;

/// Cheap to clone; every clone publishes to the same watchers.
#[derive(Clone, Debug)]
pub struct EventBus {
    tx: broadcast::Sender<Event>,
}

impl Default for EventBus {
    fn default() -> Self {
        EventBus::new()
    }
}

impl EventBus {
    pub fn new() -> EventBus {
        EventBus::with_capacity(DEFAULT_CAPACITY)
    }

    pub fn with_capacity(capacity: usize) -> EventBus {
        let (tx, _) = broadcast::channel(capacity.max(1));
        EventBus { tx }
    }

    /// Never blocks, needs no runtime; does nothing when nobody watches.
    pub fn publish(&self, event: Event) {
        let _ = self.tx.send(event);
    }

    pub fn subscribe(&self) -> Subscription {
        Subscription {
            rx: self.tx.subscribe(),
        }
    }

    /// Watchers connected now.
    pub fn watchers(&self) -> usize {
        self.tx.receiver_count()
    }
}

/// One watcher's view of the bus.
#[derive(Debug)]
pub struct Subscription {
    rx: broadcast::Receiver<Event>,
}

impl Subscription {
    /// The next event, or a `lagged` event when some were dropped for this
    /// watcher. `None` when every publisher is gone.
    pub async fn next(&mut self) -> Option<Event> {
        match self.rx.recv().await {
            Ok(event) => Some(event),
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                Some(Event::now(EventKind::Lagged { missed }))
            }
            Err(broadcast::error::RecvError::Closed) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slow_watcher_gets_lagged() {
        let bus = EventBus::with_capacity(2);
        let mut sub = bus.subscribe();
        for i in 0..5 {
            bus.publish(Event::now(EventKind::VolumeCreated {
                name: format!("v{i}"),
            }));
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            let first = sub.next().await.unwrap();
            assert_eq!(first.kind, EventKind::Lagged { missed: 3 });
            let next = sub.next().await.unwrap();
            assert_eq!(next.kind, EventKind::VolumeCreated { name: "v3".into() });
        });
    }

    #[test]
    fn an_event_without_watchers_is_dropped_and_later_watchers_see_only_later_ones() {
        let bus = EventBus::new();
        bus.publish(Event::now(EventKind::ExportStopped { volume: "a".into() }));
        assert_eq!(bus.watchers(), 0);
        let mut sub = bus.subscribe();
        assert_eq!(bus.watchers(), 1);
        bus.publish(Event::now(EventKind::ExportStopped { volume: "b".into() }));
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let next = rt.block_on(sub.next()).unwrap();
        assert_eq!(next.kind, EventKind::ExportStopped { volume: "b".into() });
    }
}
