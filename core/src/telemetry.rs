//! Logging set-up shared by every Weft binary, so `--log-level` and `--log-format` mean the same
//! everywhere.

use clap::{Args, ValueEnum};
use tracing_subscriber::{fmt, EnvFilter};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// One JSON object per line, for log collectors.
    Json,
    /// Human-readable lines.
    Text,
}

#[derive(Clone, Debug, Args)]
pub struct LogArgs {
    /// Minimum level to log (trace, debug, info, warn, error), or a full filter directive such as
    /// `info,weft_agent=debug`. `RUST_LOG` overrides it when set.
    #[arg(long, default_value = "info", global = true)]
    pub log_level: String,

    /// Log line format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
}

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("invalid --log-level {value:?}: {source}; use trace, debug, info, warn or error")]
    InvalidLevel {
        value: String,
        source: tracing_subscriber::filter::ParseError,
    },
    #[error("logging was already initialised in this process")]
    AlreadyInitialised,
}

impl LogArgs {
    /// The filter these arguments ask for; `RUST_LOG` wins so operators can debug without
    /// editing manifests.
    pub fn filter(&self) -> Result<EnvFilter, TelemetryError> {
        let directive = std::env::var("RUST_LOG")
            .ok()
            .filter(|value| !value.is_empty())
            .unwrap_or_else(|| self.log_level.clone());
        EnvFilter::try_new(&directive).map_err(|source| TelemetryError::InvalidLevel {
            value: directive,
            source,
        })
    }

    /// Installs the global subscriber. Logs go to stderr so commands that print data (weftctl)
    /// keep stdout clean.
    pub fn init(&self) -> Result<(), TelemetryError> {
        let filter = self.filter()?;
        let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr);
        let result = match self.log_format {
            LogFormat::Json => builder.json().flatten_event(true).try_init(),
            LogFormat::Text => builder.try_init(),
        };
        result.map_err(|_| TelemetryError::AlreadyInitialised)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(level: &str) -> LogArgs {
        LogArgs {
            log_level: level.to_owned(),
            log_format: LogFormat::Text,
        }
    }

    #[test]
    fn levels_and_directives_are_accepted_and_nonsense_is_named() {
        // RUST_LOG would override the flag; these assertions are about the flag.
        if std::env::var_os("RUST_LOG").is_some() {
            return;
        }
        assert!(args("debug").filter().is_ok());
        assert!(args("info,weft_agent=trace").filter().is_ok());
        let err = args("loud=[").filter().unwrap_err().to_string();
        assert!(err.contains("loud=["), "{err}");
    }
}
