// Integration tests wait on real processes with the wall clock.
#![allow(clippy::disallowed_methods, clippy::unwrap_used)]

//! Faults an unattended agent meets, survived with real processes: nothing lost, nothing
//! doubled, the host not left half-configured. Each test prints one row of the table in
//! the README ("Faults survived"), which `bash tests/faults/table.sh` prints.

#[path = "../common/mod.rs"]
mod common;

mod backend_misbehaving;
mod clock_jump;
mod disk_full;
mod helper_killed;
mod helper_killed_write;

/// One row of the README's table: fault, what the agent did, what was lost, time to recover.
pub fn row(fault: &str, did: &str, lost: &str, recovered: std::time::Duration) {
    eprintln!("| {fault} | {did} | {lost} | {:.1} s |", recovered.as_secs_f64());
}
