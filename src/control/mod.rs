//! The control plane: the JSON-lines control socket, its protocol types,
//! peer authentication, the event bus, the Prometheus endpoint, and the
//! blocking client that vdiskctl uses.
//!
//! No storage logic lives here. The server parses a request, calls the
//! daemon's [`Service`] on a blocking thread, and writes the reply. It runs
//! on a tokio runtime of its own thread; the data plane never waits on it.
//! docs/PROTOCOL.md describes the wire format.

pub mod auth;
pub mod cli;
pub mod client;
mod conn;
pub mod events;
mod line;
pub mod metrics;
mod progress;
pub mod protocol;
mod rt;
pub mod server;

pub use auth::AuthPolicy;
pub use client::{Client, ClientError};
pub use events::EventBus;
pub use protocol::{ApiError, Call, ErrorCode, Event, EventKind, Progress, Response, StatsResult};
pub use server::{ControlHandle, Server, ServerError};

/// What the daemon implements. Both methods run on blocking threads, so a
/// slow call (a fetch) holds up only its own client.
pub trait Service: Send + Sync + 'static {
    /// Carries out one call. The server answers `version`, `watch` and
    /// `stats` itself and never passes them here. The result must be the
    /// [`Response`] variant for the call's method (see
    /// [`protocol::Shape::of`]); another one reaches the client as
    /// `internal`. Long calls report `progress` (bytes done and total); the
    /// server throttles the reports, publishes them on the event bus and
    /// forwards them to the caller. Events about what changed
    /// (`volume.created`…) are the daemon's to publish on its [`EventBus`].
    fn call(&self, call: Call, progress: &dyn Fn(Progress)) -> Result<Response, ApiError>;

    /// Current figures, for `stats` and the Prometheus endpoint.
    fn metrics(&self) -> StatsResult;
}
