//! The contract between the opsagent daemon and its root helper.
//!
//! - [`catalogue`]: the typed, normalised parameters of every state module the backend
//!   can send ("parse, don't validate": a recipe state that gets past
//!   [`catalogue::parse_state`] is well typed).
//! - [`request`]: the closed set of requests the helper accepts and what it answers.
//! - [`newtypes`]: validated values (absolute paths, modes, state ids, unit names).
//! - [`param_types`]: the types of parameter values, each accepting every wire shape real
//!   recipes send for it (one-line, text, dict, mode, watch, ...).
//! - [`checks`]: the narrower checks of what a parameter means (accounts, cron fields, ...).
//! - [`codec`]: u32 big-endian length-prefixed JSON frames with a size cap.
//! - [`stream`]: the socket both ends use, split into a frame reader and writer.
//! - [`signed`]: the canonical bytes of a signed recipe, its trusted comment, and the
//!   decoder the helper reads a verified recipe with.
//!
//! One definition, two users: the daemon needs the catalogue to check recipes, the
//! helper uses the same types as its request format and re-validates what only it can
//! judge (paths, users, policy).

pub mod catalogue;
pub mod checks;
pub mod codec;
pub mod newtypes;
pub mod param_types;
pub mod request;
pub mod signed;
pub mod stream;

/// Version of the daemon <-> helper protocol (the agent <-> backend protocol has its own,
/// `opsagent::protocol::BACKEND_PROTOCOL_VERSION`). Bumped on any incompatible change of
/// [`request::Request`] or [`request::Reply`]; the helper refuses other versions in
/// `Hello` with a message that names both.
pub const HELPER_PROTOCOL_VERSION: u32 = 1;
