//! The multicall binary: pick a role from argv[0] or the first argument and
//! hand over. Everything else lives in `applets/` (roles) and `src/` (core).

#[path = "../applets/mod.rs"]
mod applets;

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args_os()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    std::process::ExitCode::from(applets::dispatch(args))
}
