//! vdisk: a per-host service that gives virtual machines their disks over
//! vhost-user-blk. See docs/ARCHITECTURE.md for the map of this crate.

#![deny(clippy::undocumented_unsafe_blocks)]

pub mod block;
pub mod cache;
pub mod catalog;
pub mod config;
pub mod control;
pub mod daemon;
pub mod pool;
pub mod service;
pub mod sys;
pub mod vhost;
