//! The subcommands of `opsagent`, one file each; `crate::cli` parses the command line and
//! calls them.

pub mod apply;
pub mod check;
pub mod logs;
pub mod run;
pub mod status;
pub mod stop;

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    // One thread: the daemon's work is sequential and mostly waiting; this keeps its
    // footprint small.
    Ok(tokio::runtime::Builder::new_current_thread().enable_all().build()?)
}
