//! A tokio runtime on a thread of its own, for the control plane. The data
//! plane never runs on it and never waits for it.

use std::future::Future;
use std::io;
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::runtime::{Builder, Runtime};
use tokio::sync::oneshot;

/// Service calls run on blocking threads (a fetch can take minutes); this
/// bounds how many run at once. Further calls wait for a free thread.
const MAX_BLOCKING_THREADS: usize = 32;

/// How long `stop` waits for service calls still running. They are not
/// cancelled: their threads finish on their own, their replies are dropped.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

pub(crate) fn runtime(name: &str) -> io::Result<Runtime> {
    Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .max_blocking_threads(MAX_BLOCKING_THREADS)
        .thread_name(format!("{name}-call"))
        .build()
}

/// A thread running one future on its runtime until told to stop.
#[derive(Debug)]
pub(crate) struct RuntimeThread {
    stop: Option<oneshot::Sender<()>>,
    join: Option<JoinHandle<()>>,
}

impl RuntimeThread {
    /// Runs `body(stop)` on `rt` in a new thread; `stop` resolves when
    /// [`RuntimeThread::stop`] is called or the handle dropped.
    pub(crate) fn spawn<F, Fut>(name: &str, rt: Runtime, body: F) -> io::Result<RuntimeThread>
    where
        F: FnOnce(oneshot::Receiver<()>) -> Fut + Send + 'static,
        Fut: Future<Output = ()>,
    {
        let (tx, rx) = oneshot::channel();
        let join = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                rt.block_on(body(rx));
                rt.shutdown_timeout(SHUTDOWN_GRACE);
            })?;
        Ok(RuntimeThread {
            stop: Some(tx),
            join: Some(join),
        })
    }

    /// Stops the future and waits for the thread.
    pub(crate) fn stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(join) = self.join.take() {
            if join.join().is_err() {
                log::error!("control: runtime thread panicked");
            }
        }
    }
}

impl Drop for RuntimeThread {
    fn drop(&mut self) {
        self.stop();
    }
}
