//! `opsagent check`: recipe files against the state catalogue, one line per state.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use crate::recipe::Recipe;

pub fn cmd_check(files: &[PathBuf]) -> anyhow::Result<ExitCode> {
    let mut all_ok = true;
    let mut out = std::io::stdout().lock();
    for file in files {
        match Recipe::load_file(file) {
            Err(e) => {
                all_ok = false;
                writeln!(out, "INVALID {e}")?;
            }
            Ok(recipe) => {
                for s in &recipe.states {
                    match s.typed() {
                        Ok(p) if p.warnings.is_empty() => {
                            writeln!(out, "ok      {}  {}  {}", file.display(), s.id, s.module)?
                        }
                        Ok(p) => writeln!(
                            out,
                            "ok      {}  {}  {}  warning: {}",
                            file.display(),
                            s.id,
                            s.module,
                            p.warnings.join("; ")
                        )?,
                        Err(reason) => {
                            all_ok = false;
                            writeln!(out, "INVALID {}  {}  {}  {reason}", file.display(), s.id, s.module)?;
                        }
                    }
                }
            }
        }
    }
    Ok(if all_ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
