//! Errors of the harness: a test host that cannot be run or did not come up.

use std::io;
use std::path::PathBuf;

/// Why a test host run could not take place or its test host is unusable.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// QEMU is not installed on this machine.
    #[error("qemu-system-x86_64 is not in PATH: run resources/install-deps.sh")]
    QemuMissing,
    /// A preparation script failed.
    #[error("{script} failed ({status}); its output:\n{output}")]
    Prepare {
        /// The script that failed.
        script: String,
        /// Its exit status.
        status: String,
        /// What it printed (stdout and stderr).
        output: String,
    },
    /// The rvmm binary to test does not exist.
    #[error(
        "the rvmm binary {} does not exist: build it with `cargo build --release -p rvmm` \
         or point RVMM_BIN at one",
        path.display()
    )]
    RvmmMissing {
        /// Where it was looked for.
        path: PathBuf,
    },
    /// A file of the run could not be created, written or locked.
    #[error("cannot {action} {}", path.display())]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The test host script could not be started.
    #[error("cannot start {command}")]
    Spawn {
        /// The command line.
        command: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The test host booted but lacks something every test needs.
    #[error("test host run '{name}' is unusable: {reason}\n{context}")]
    HostNotReady {
        /// The run's name.
        name: String,
        /// What is missing.
        reason: String,
        /// Log path and console tail.
        context: String,
    },
}

/// Result of harness operations.
pub type Result<T> = std::result::Result<T, Error>;

/// Formats an error with all its sources, one per line.
pub(crate) fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str("\n  caused by: ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_lists_every_source() {
        let error = Error::Io {
            action: "write",
            path: PathBuf::from("/x/y.log"),
            source: io::Error::new(io::ErrorKind::PermissionDenied, "denied"),
        };

        let text = chain(&error);

        assert_eq!(text, "cannot write /x/y.log\n  caused by: denied");
    }
}
