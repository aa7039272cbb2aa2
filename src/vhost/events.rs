//! What an export tells whoever runs it: a frontend connected or went
//! away, I/O failed. The vhost layer knows nothing of the control socket;
//! the service registers an [`ExportObserver`] and turns these into events.
//!
//! Failed I/O is reported at most once per [`IO_ERROR_INTERVAL`] per export
//! (a full disk fails every write): the first failure at once, later ones
//! counted and summed up in the next report. Each one is still logged at
//! debug level.

use std::io;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One report of failed I/O per export per this long.
pub const IO_ERROR_INTERVAL: Duration = Duration::from_secs(10);

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExportEvent {
    /// A frontend connected; its pid when the socket's peer credentials
    /// give it.
    Connected {
        peer_pid: Option<u32>,
    },
    Disconnected,
    /// I/O failed; `message` says how, and how many more failures since
    /// the last report.
    IoError {
        message: String,
    },
}

pub type ExportObserver = Arc<dyn Fn(ExportEvent) + Send + Sync>;

/// One export's observer and its I/O error rate limit, shared by its
/// queue workers and its server.
pub struct ExportReporter {
    name: String,
    observer: Mutex<Option<ExportObserver>>,
    io: Mutex<IoState>,
}

#[derive(Default)]
struct IoState {
    last: Option<Instant>,
    suppressed: u64,
}

impl ExportReporter {
    pub fn new(name: &str) -> Arc<ExportReporter> {
        Arc::new(ExportReporter {
            name: name.to_string(),
            observer: Mutex::new(None),
            io: Mutex::new(IoState::default()),
        })
    }

    pub fn set_observer(&self, obs: ExportObserver) {
        *self.observer.lock().unwrap_or_else(|e| e.into_inner()) = Some(obs);
    }

    pub fn send(&self, event: ExportEvent) {
        let obs = self
            .observer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(obs) = obs {
            obs(event);
        }
    }

    /// A request on `queue` failed with `err`.
    pub fn io_failed(&self, queue: usize, err: &io::Error) {
        log::debug!("export {}: queue {queue}: I/O failed: {err}", self.name);
        let message = {
            let mut st = self.io.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            if st
                .last
                .is_some_and(|t| now.duration_since(t) < IO_ERROR_INTERVAL)
            {
                st.suppressed += 1;
                return;
            }
            let more = std::mem::take(&mut st.suppressed);
            st.last = Some(now);
            if more > 0 {
                format!(
                    "export {}: I/O failed: {err}; {more} more failures since the last report",
                    self.name
                )
            } else {
                format!("export {}: I/O failed: {err}", self.name)
            }
        };
        log::warn!("{message}");
        self.send(ExportEvent::IoError { message });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_errors_are_reported_once_per_interval_and_counted() {
        let r = ExportReporter::new("vm1");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        r.set_observer(Arc::new(move |e| s.lock().unwrap().push(e)));
        let enospc = io::Error::from_raw_os_error(libc::ENOSPC);
        for _ in 0..100 {
            r.io_failed(0, &enospc);
        }
        let got = seen.lock().unwrap().clone();
        assert_eq!(got.len(), 1, "{got:?}");
        let ExportEvent::IoError { message } = &got[0] else {
            panic!("{got:?}")
        };
        assert!(
            message.contains("vm1") && message.contains("No space"),
            "{message}"
        );
        // After the interval, the next report counts the ones in between.
        r.io.lock().unwrap().last = Some(Instant::now() - IO_ERROR_INTERVAL);
        r.io_failed(1, &enospc);
        let got = seen.lock().unwrap().clone();
        assert_eq!(got.len(), 2);
        let ExportEvent::IoError { message } = &got[1] else {
            panic!("{got:?}")
        };
        assert!(message.contains("99 more failures"), "{message}");
    }
}
