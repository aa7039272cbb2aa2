//! Progress of a long call: to the event bus for watchers and to the
//! calling connection for its progress bar, throttled for both.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::events::EventBus;
use super::protocol::{Call, Event, EventKind, Progress};

/// A progress bar redraws about ten times a second; faster reports are
/// dropped (the last one, `done == total`, always goes through).
const MIN_INTERVAL: Duration = Duration::from_millis(100);

enum Topic {
    Fetch { url: String },
    Copy { name: String },
    Other { method: &'static str },
}

impl Topic {
    fn of(call: &Call) -> Topic {
        match call {
            Call::ImageFetch(p) => Topic::Fetch { url: p.url.clone() },
            Call::VolumeCreate(p) if p.full => Topic::Copy {
                name: p.name.clone(),
            },
            other => Topic::Other {
                method: other.method(),
            },
        }
    }

    fn event(&self, p: Progress) -> EventKind {
        let Progress { done, total } = p;
        match self {
            Topic::Fetch { url } => EventKind::ImageFetchProgress {
                url: url.clone(),
                done,
                total,
            },
            Topic::Copy { name } => EventKind::VolumeCopyProgress {
                name: name.clone(),
                done,
                total,
            },
            Topic::Other { method } => EventKind::Progress {
                method: (*method).to_string(),
                done,
                total,
            },
        }
    }
}

/// Given to the service as `&dyn Fn(Progress)`; called on its thread.
pub(crate) struct Reporter {
    topic: Topic,
    bus: EventBus,
    tx: watch::Sender<Progress>,
    last: Mutex<Option<Instant>>,
}

impl Reporter {
    pub(crate) fn new(call: &Call, bus: EventBus) -> (Reporter, watch::Receiver<Progress>) {
        let (tx, rx) = watch::channel(Progress::default());
        let reporter = Reporter {
            topic: Topic::of(call),
            bus,
            tx,
            last: Mutex::new(None),
        };
        (reporter, rx)
    }

    pub(crate) fn report(&self, p: Progress) {
        let now = Instant::now();
        {
            let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
            let recent = last.is_some_and(|t| now.duration_since(t) < MIN_INTERVAL);
            if recent && !p.finished() {
                return;
            }
            *last = Some(now);
        }
        self.bus.publish(Event::now(self.topic.event(p)));
        // Nobody listening (the client did not ask) is fine.
        let _ = self.tx.send(p);
    }
}
