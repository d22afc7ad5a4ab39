//! ctrl-exec core library.
//!
//! The binary in `src/main.rs` only picks a role; the roles in `applets/` wire
//! these modules together. The modules read top-down along one request:
//!
//! | module | owns |
//! | --- | --- |
//! | [`config`] | `key = value` files with sections; errors name file and line |
//! | [`tls`] | the TLS policy, acceptor/connector builders, the async adapter |
//! | [`http`] | HTTP/1.0 framing with limits; nothing about routes |
//! | [`wire`] | JSON helpers, request ids, serial canonicalisation, timestamps |
//! | [`trust`] | trusted-dispatcher map and revocation list files |
//! | [`allowlist`] | `scripts.conf`, script names, `script_dirs`, annotations |
//! | [`exec`] | spawning scripts: argv, environment, stdin, capped capture, timeouts |
//! | [`hook`] | the auth hook contract, shared by both sides |
//! | [`audit`] | `ACTION=` event lines and the syslog / stderr sinks |
//! | [`ca`] | keys, CSRs, certificates, signing, pairing codes |
//! | [`registry`] | the dispatcher's agent records |
//! | [`runstore`] | the dispatcher's run records (`/status`) |
//! | [`locks`] | one run of a script per host at a time |
//! | [`openapi`] | the live OpenAPI document built from the fleet |
//! | [`fsutil`] | atomic writes and file locks used by every state file |
//! | [`client`], [`fanout`] | the dispatcher's per-host call and its bounded fan-out |
//! | [`dispatch`] | operations on many agents, shared by the CLI and the API server |
//! | [`server`] | the agent's handling of one authenticated connection |
//! | [`armor`] | checksummed text blocks that survive a serial console |
//! | [`rotate`] | the agent's `/rotate-serial` (trusted map changes by a dispatcher) |
//! | [`identity`] | the dispatcher's current and previous certificate, chosen per agent |
//! | [`rotation`] | dispatcher certificate rotation: state, broadcast, expiry, retirement |
//! | [`bundle`] | the text-safe enrolment bundle |
//! | [`pairing`] | pairing requests, the approval queue, signing, the listener's side |
//! | [`offline`] | pairing as text over a serial console: request, reply, idempotent steps |
//! | [`pairagent`] | pairing from the agent's side: request, wait, install |
//! | [`ratelimit`] | per-address connection volume limits |
//! | [`renew`] | agent certificate renewal: the agent's endpoints and the dispatcher's exchange |
//! | [`maintain`] | the maintenance pass (`ctrl-exec maintain`): isolated phases |

pub mod allowlist;
pub mod armor;
pub mod asyncrun;
pub mod audit;
pub mod bundle;
pub mod ca;
pub mod client;
pub mod config;
pub mod dispatch;
pub mod error;
pub mod exec;
pub mod fanout;
pub mod fsutil;
pub mod hook;
pub mod http;
pub mod identity;
pub mod locks;
pub mod maintain;
pub mod offline;
pub mod openapi;
pub mod pairagent;
pub mod pairing;
pub mod ratelimit;
pub mod registry;
pub mod renew;
pub mod rotate;
pub mod rotation;
pub mod runstore;
pub mod server;
pub mod time;
pub mod tls;
pub mod trust;
pub mod wire;

/// Version string reported by `--version`, `/ping` and `/capabilities`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
