//! The multicall binary: pick a role from argv[0] or the first argument and
//! hand over. Everything else lives in `applets/` (roles) and `src/` (core).

#[path = "../applets/mod.rs"]
mod applets;

fn main() -> std::process::ExitCode {
    // Arguments travel as JSON strings, which are UTF-8: refuse anything else
    // rather than altering it on the way.
    let mut args = Vec::new();
    for (i, a) in std::env::args_os().enumerate() {
        match a.into_string() {
            Ok(s) => args.push(s),
            Err(raw) if i == 0 => args.push(raw.to_string_lossy().into_owned()),
            Err(raw) => {
                eprintln!(
                    "ctrl-exec: argument {i} ({}) is not valid UTF-8; arguments must be UTF-8 text",
                    raw.to_string_lossy()
                );
                return std::process::ExitCode::from(2);
            }
        }
    }
    std::process::ExitCode::from(applets::dispatch(args))
}
