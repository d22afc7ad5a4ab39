//! The error every applet returns: a message for the operator and the exit
//! code that goes with it.
//!
//! Each layer has its own error type (`ConfigError`, `CaError`, `HttpError`,
//! `CallError`, …) that knows what went wrong; at the applet boundary they all
//! become a [`Fail`], which only knows what to tell the operator and how the
//! process should exit. The exit-code policy lives here and nowhere else.

use std::fmt;

/// Exit code for success.
pub const EXIT_OK: u8 = 0;
/// Generic failure (a host failed, a request was refused, an I/O error).
pub const EXIT_FAIL: u8 = 1;
/// The command line could not be understood.
pub const EXIT_USAGE: u8 = 2;
/// A configuration file is malformed or incomplete (`EX_CONFIG` from sysexits.h;
/// systemd units use `RestartPreventExitStatus=78`).
pub const EXIT_CONFIG: u8 = 78;

/// An operator-facing failure with its exit code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fail {
    /// Process exit code.
    pub code: u8,
    /// One or more lines for stderr; never empty.
    pub msg: String,
}

impl Fail {
    /// A generic failure (exit 1).
    pub fn new(msg: impl Into<String>) -> Self {
        Fail { code: EXIT_FAIL, msg: msg.into() }
    }
    /// A usage error (exit 2).
    pub fn usage(msg: impl Into<String>) -> Self {
        Fail { code: EXIT_USAGE, msg: msg.into() }
    }
    /// A configuration error (exit 78).
    pub fn config(msg: impl Into<String>) -> Self {
        Fail { code: EXIT_CONFIG, msg: msg.into() }
    }
    /// Same failure with a different exit code.
    pub fn with_code(mut self, code: u8) -> Self {
        self.code = code;
        self
    }
}

impl fmt::Display for Fail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.msg)
    }
}

impl std::error::Error for Fail {}

impl From<crate::config::ConfigError> for Fail {
    fn from(e: crate::config::ConfigError) -> Self {
        Fail::config(e.to_string())
    }
}

impl From<crate::ca::CaError> for Fail {
    fn from(e: crate::ca::CaError) -> Self {
        Fail::new(e.to_string())
    }
}

impl From<crate::fsutil::FsError> for Fail {
    fn from(e: crate::fsutil::FsError) -> Self {
        Fail::new(e.to_string())
    }
}

/// Result type of every applet entry point: the exit code on success.
pub type AppResult = Result<u8, Fail>;
