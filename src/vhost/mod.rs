//! The vhost-user-blk device: virtio-blk requests in, block-layer
//! operations out. Nothing here knows about JSON or the control socket.

pub mod config;
pub mod device;
pub mod events;
pub mod request;
pub mod server;
pub mod stats;
pub mod worker;

pub use config::DeviceConfig;
pub use device::BlockDevice;
