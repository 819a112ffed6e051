//! opsagent: the unprivileged network daemon of the VisualOps agent, its CLI, and the
//! reference backend used by tests, demos and operators without a backend.
//!
//! A state travels one way through this crate: a backend frame becomes a
//! [`protocol::Inbound`] message, its states become typed
//! [`opsagent_proto::catalogue::ModuleParams`], the [`round`] engine runs them through a
//! [`helper_client::HelperClient`], and each result goes back as a StateLog.

pub mod atomic_file;
pub mod backend;
pub mod cancel;
pub mod cli;
pub mod cmd;
pub mod config;
pub mod daemon;
pub mod download;
pub mod drift;
pub mod helper_client;
pub mod instance_identity;
pub mod link;
pub mod logbundle;
pub mod logframes;
pub mod logging;
pub mod logupload;
pub mod manual;
pub mod metrics;
pub mod net;
pub mod prereq;
pub mod private_helper;
pub mod protocol;
pub mod recipe;
pub mod round;
pub mod service_notify;
pub mod spool;
pub mod state_lock;
pub mod timefmt;
pub mod upgrade;
pub mod version;
