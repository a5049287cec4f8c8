//! rvmm's own log (the `rvmm` binary's; library users keep their own logger): `--log-level`,
//! `--log-file` and `RUST_LOG`, every line with a UTC timestamp, the level, the thread name and
//! the module.
//!
//! Precedence: without either, `warn`. `RUST_LOG` (env_logger's syntax) is read first;
//! `--log-level` then sets the level of everything `RUST_LOG` does not name by module, so
//! `RUST_LOG=rvmm::hotplug=trace --log-level info` logs the controller at `trace` and the rest
//! at `info`, and `--log-level` overrides a bare `RUST_LOG=debug`.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use log::LevelFilter;
use thiserror::Error;

/// The environment variable read for filters.
pub const RUST_LOG: &str = "RUST_LOG";

/// `--log-level`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogLevel {
    /// Errors only.
    Error,
    /// Errors and warnings (the default).
    Warn,
    /// Also what rvmm does (devices added, the API listening...).
    Info,
    /// Also details.
    Debug,
    /// Everything.
    Trace,
}

impl From<LogLevel> for LevelFilter {
    fn from(l: LogLevel) -> Self {
        match l {
            LogLevel::Error => LevelFilter::Error,
            LogLevel::Warn => LevelFilter::Warn,
            LogLevel::Info => LevelFilter::Info,
            LogLevel::Debug => LevelFilter::Debug,
            LogLevel::Trace => LevelFilter::Trace,
        }
    }
}

/// Errors of setting up the log.
#[derive(Debug, Error)]
pub enum LoggingError {
    /// The log file cannot be opened.
    #[error("cannot open the log file {path} (--log-file)")]
    Open {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A logger is installed already.
    #[error("a logger is installed already")]
    AlreadySet(#[source] log::SetLoggerError),
}

/// Opens `path` for appending (created if needed).
pub fn open_log_file(path: &Path) -> Result<File, LoggingError> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|source| LoggingError::Open {
            path: path.to_owned(),
            source,
        })
}

/// The logger: filters from `rust_log` (the value of `RUST_LOG`) and `level`, lines to `file`
/// or else stderr.
pub fn builder(
    rust_log: Option<&str>,
    level: Option<LogLevel>,
    file: Option<File>,
) -> env_logger::Builder {
    let mut b = env_logger::Builder::new();
    b.filter_level(LevelFilter::Warn);
    if let Some(filters) = rust_log.filter(|f| !f.trim().is_empty()) {
        b.parse_filters(filters);
    }
    if let Some(level) = level {
        b.filter_level(level.into());
    }
    b.format(|buf, record| {
        let thread = std::thread::current();
        writeln!(
            buf,
            "[{} {:<5} {} {}] {}",
            buf.timestamp_millis(),
            record.level(),
            thread.name().unwrap_or("unnamed"),
            record.target(),
            record.args()
        )
    });
    if let Some(file) = file {
        b.write_style(env_logger::WriteStyle::Never);
        b.target(env_logger::Target::Pipe(Box::new(file)));
    }
    b
}

/// Installs rvmm's logger: the log file (if any) is opened here, so call this before any
/// thread starts (the threads' seccomp filters allow no `open`).
pub fn init(level: Option<LogLevel>, file: Option<&Path>) -> Result<(), LoggingError> {
    let file = file.map(open_log_file).transpose()?;
    let rust_log = std::env::var(RUST_LOG).ok();
    builder(rust_log.as_deref(), level, file)
        .try_init()
        .map_err(LoggingError::AlreadySet)
}

#[cfg(test)]
mod tests {
    use log::{Level, Record};

    use super::*;

    fn logs(logger: &env_logger::Logger, target: &str, level: Level) -> bool {
        logger.matches(&Record::builder().target(target).level(level).build())
    }

    #[test]
    fn default_is_warn() {
        let b = builder(None, None, None).build();
        assert!(logs(&b, "rvmm::vm", Level::Warn));
        assert!(!logs(&b, "rvmm::vm", Level::Info));
    }

    #[test]
    fn rust_log_alone_still_works() {
        let b = builder(Some("debug"), None, None).build();
        assert!(logs(&b, "rvmm::vm", Level::Debug));
    }

    #[test]
    fn level_flag_overrides_the_rust_log_default() {
        let b = builder(Some("debug"), Some(LogLevel::Error), None).build();
        assert!(!logs(&b, "rvmm::vm", Level::Warn));
        assert!(logs(&b, "rvmm::vm", Level::Error));
    }

    #[test]
    fn rust_log_module_directives_survive_the_level_flag() {
        let b = builder(Some("rvmm::hotplug=trace"), Some(LogLevel::Info), None).build();
        assert!(logs(&b, "rvmm::hotplug::controller", Level::Trace));
        assert!(logs(&b, "rvmm::vm", Level::Info));
        assert!(!logs(&b, "rvmm::vm", Level::Debug));
    }

    #[test]
    fn lines_carry_timestamp_level_thread_and_module() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("rvmm.log");
        let file = open_log_file(&path).expect("opens");
        let logger = builder(None, Some(LogLevel::Info), Some(file)).build();

        std::thread::Builder::new()
            .name("rvmm-test".into())
            .spawn(move || {
                log::Log::log(
                    &logger,
                    &Record::builder()
                        .target("rvmm::vm")
                        .level(Level::Info)
                        .args(format_args!("hello"))
                        .build(),
                );
                log::Log::flush(&logger);
            })
            .expect("thread")
            .join()
            .expect("joined");

        let text = std::fs::read_to_string(&path).expect("readable");
        let re = regex::Regex::new(
            r"^\[\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z INFO  rvmm-test rvmm::vm\] hello\n$",
        )
        .expect("regex");
        assert!(re.is_match(&text), "{text:?}");
    }

    #[test]
    fn unopenable_log_file_names_the_flag() {
        let err = open_log_file(Path::new("/nonexistent/dir/rvmm.log")).expect_err("no dir");
        assert!(err.to_string().contains("--log-file"), "{err}");
    }
}
