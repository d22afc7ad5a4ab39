//! `ctrl-exec maintain`: the maintenance pass for root's timer
//! (`ctrl-exec-maintenance.timer`). The phases live in
//! `ctrl_exec::maintain`; this is only the verb and its output.

use argh::FromArgs;
use ctrl_exec::error::{AppResult, EXIT_FAIL, EXIT_OK};
use ctrl_exec::wire::Obj;
use miniserde::json::{Array, Value};

use super::common;

#[derive(FromArgs)]
/// Ping every registered agent (renewing certificates that are due), then
/// purge run records older than 24 h; each phase runs even if another failed.
#[argh(subcommand, name = "maintain", help_triggers("-h", "--help"))]
pub struct MaintainArgs {
    /// config file (default $CTRL_EXEC_CONFIG or /etc/ctrl-exec/ctrl-exec.conf)
    #[argh(option)]
    config: Option<String>,
    /// print one JSON document instead of text
    #[argh(switch)]
    json: bool,
    /// write audit lines to stderr instead of syslog
    #[argh(switch)]
    log_stderr: bool,
}

/// Run the pass; exit 1 if a phase failed (unreachable agents are not a
/// phase failure: they are logged and retried next time).
pub fn maintain(a: MaintainArgs) -> AppResult {
    let cfg = common::load_dispatcher(&a.config)?;
    common::init_audit("ctrl-exec-dispatcher", &cfg.log, a.log_stderr);
    let report = ctrl_exec::maintain::run(&cfg);
    let ok = report.failures.is_empty();
    if a.json {
        let mut o = Obj::new()
            .b("ok", ok)
            .i("agents", report.agents as i64)
            .i("pinged", report.pinged as i64)
            .i("renewed", report.renewed as i64)
            .b("rotated", report.rotated);
        if !ok {
            let errors: Array = report
                .failures
                .iter()
                .map(|(phase, e)| Obj::new().s("phase", *phase).s("error", e).into_value())
                .collect();
            o = o.v("errors", Value::Array(errors));
        }
        println!("{}", o.to_json());
    } else {
        super::cli::print_renewals(&report.results);
        for (phase, e) in &report.failures {
            eprintln!("maintain: phase '{phase}' failed: {e}");
        }
        if report.rotated {
            println!("The dispatcher certificate was due and has been rotated (see 'ctrl-exec serial-status').");
        }
        println!("Maintenance run: {}/{} agents pinged, dispatcher cert checked.", report.pinged, report.agents);
    }
    Ok(if ok { EXIT_OK } else { EXIT_FAIL })
}
