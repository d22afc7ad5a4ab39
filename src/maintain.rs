//! The maintenance pass (`ctrl-exec maintain`, behaviour.md §5.7), run by
//! root's `ctrl-exec-maintenance.timer` every few hours.
//!
//! Phases run in order, each isolated: a phase that fails is logged
//! (`maintain` at ERR with `PHASE` and `ERROR`) and the next one still runs.
//!
//! 1. `ping`: ping every registered agent and renew the certificates that
//!    are due ([`crate::renew`]);
//! 2. the dispatcher certificate (`crate::rotation`): rotate when due,
//!    broadcast the serial, expire the overlap window, retire;
//! 3. `purge`: drop run records older than 24 h from `runs_dir`.

use std::time::Duration;

use miniserde::json::Object;

use crate::audit;
use crate::client::Target;
use crate::config::DispatcherConfig;
use crate::dispatch::{self, Engine};
use crate::registry::Registry;
use crate::renew;
use crate::runstore::{RunStore, TTL_SECS};
use crate::wire::get_str;

/// What one maintenance pass did.
#[derive(Debug, Default)]
pub struct Report {
    /// Registered agents.
    pub agents: usize,
    /// Agents that answered `/ping` with `status: ok`.
    pub pinged: usize,
    /// Agents whose certificate was renewed (staged).
    pub renewed: usize,
    /// The renewal pass in detail.
    pub renewal: renew::Summary,
    /// Run records purged.
    pub purged: usize,
    /// The dispatcher certificate was rotated (it was due).
    pub rotated: bool,
    /// Per-agent ping results (with the renewal notes of [`renew::renew_due`]).
    pub results: Vec<Object>,
    /// Phases that failed: (phase, error).
    pub failures: Vec<(&'static str, String)>,
}

impl Report {
    fn phase(&mut self, phase: &'static str, r: Result<(), String>) {
        if let Err(e) = r {
            audit::err("maintain", &[("PHASE", phase), ("ERROR", &e)]);
            self.failures.push((phase, e));
        }
    }
}

/// Run every phase; never stops early.
pub fn run(cfg: &DispatcherConfig) -> Report {
    let mut report = Report::default();
    let r = ping_phase(cfg, &mut report);
    report.phase("ping", r);

    // Dispatcher certificate: rotate if due, broadcast the serial to agents
    // that have not confirmed it, expire the overlap window, retire.
    for (phase, e) in rotation_phase(cfg, &mut report) {
        report.phase(phase, Err(e));
    }

    let r = purge_phase(cfg, &mut report);
    report.phase("purge", r);
    audit::info(
        "maintain",
        &[
            ("AGENTS", &report.agents.to_string()),
            ("PINGED", &report.pinged.to_string()),
            ("RENEWED", &report.renewed.to_string()),
            ("PURGED", &report.purged.to_string()),
        ],
    );
    report
}

/// Ping every registered agent, then renew the certificates that are due.
fn ping_phase(cfg: &DispatcherConfig, report: &mut Report) -> Result<(), String> {
    let reg = Registry::new(&cfg.registry_dir);
    let names = reg.names().map_err(|e| e.to_string())?;
    report.agents = names.len();
    let mut targets: Vec<Target> = Vec::new();
    let mut unreadable = Vec::new();
    for name in names {
        // One unreadable record costs that agent's ping, not everyone's.
        match dispatch::resolve(&reg, std::slice::from_ref(&name), None) {
            Ok(mut t) => targets.append(&mut t),
            Err(e) => {
                audit::err("ping", &[("TARGET", &name), ("ERROR", &e.to_string())]);
                unreadable.push(name);
            }
        }
    }
    if !targets.is_empty() {
        let engine =
            Engine::open(cfg.clone(), true).map_err(|e| format!("cannot load the dispatcher identity: {e}"))?;
        let reqid = crate::wire::new_reqid();
        let mut results = Vec::new();
        smol::block_on(async {
            engine.ping(&targets, &reqid, |r| results.push(r)).await;
            report.renewal = renew::renew_due(&engine, &targets, &mut results).await;
        });
        report.pinged = results.iter().filter(|r| get_str(r, "status").as_deref() == Some("ok")).count();
        report.renewed = report.renewal.renewed;
        report.results = results;
    }
    if unreadable.is_empty() { Ok(()) } else { Err(format!("unreadable registry records: {}", unreadable.join(", "))) }
}

/// The rotation pass of `crate::rotation`; returns the sub-phases that failed.
fn rotation_phase(cfg: &DispatcherConfig, report: &mut Report) -> Vec<(&'static str, String)> {
    let engine = match Engine::open(cfg.clone(), true) {
        Ok(e) => e,
        Err(e) => return vec![("rotation", format!("cannot load the dispatcher identity: {e}"))],
    };
    let m = crate::rotation::rotation_maintenance(cfg, &engine);
    report.rotated = m.rotated.is_some();
    m.errors
}

/// Drop run records older than a day.
fn purge_phase(cfg: &DispatcherConfig, report: &mut Report) -> Result<(), String> {
    let dir = &cfg.runs_dir;
    if dir.exists() && std::fs::read_dir(dir).is_err() {
        return Err(format!("cannot read the run store {}", dir.display()));
    }
    report.purged = RunStore::new(dir).purge(Duration::from_secs(TTL_SECS));
    Ok(())
}
