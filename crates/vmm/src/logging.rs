//! The VMM's log: `tracing` events written to stderr, which `ray vm run` points at the VM
//! directory's `vmm.log`. `RUST_LOG` chooses what is written (`info` by default for a VMM;
//! `RUST_LOG=ray_vmm::controller=debug,info` for more of one part), `RAY_LOG_FORMAT` (or
//! `ray --log-format`) how: `text`, one human line per event, or `json`, one JSON object per
//! line with the spans it happened in (`vm` with the VM's id, `migration` with its direction
//! and peer).
//!
//! Spans are per thread in `tracing`; [`SpawnInSpan::spawn_in_span`] starts a thread inside the spans current
//! where it is called, so a vCPU's or a migration's events carry the VM they belong to.

use std::str::FromStr;

use std::thread::{Builder, JoinHandle};

use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

/// How log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// `2026-12-03T13:20:01.123456Z  INFO vm{id=web}: ray_vmm::controller: ...`
    #[default]
    Text,
    /// One JSON object per line: `timestamp`, `level`, `fields.message`, `target`, `span`,
    /// `spans`.
    Json,
}

impl LogFormat {
    pub const NAMES: [&'static str; 2] = ["text", "json"];

    pub fn name(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

impl FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!(
                "unknown log format '{other}': expected one of {}",
                Self::NAMES.join(", ")
            )),
        }
    }
}

/// The filter `RUST_LOG` names, or `default` (a level such as `info`) when it is unset.
/// A `RUST_LOG` that does not parse is reported on stderr and the default used, so a typo
/// never silences the log.
pub fn filter_from_env(default: &str) -> Targets {
    let fallback = || Targets::from_str(default).unwrap_or_default();
    match std::env::var("RUST_LOG") {
        Ok(spec) if !spec.trim().is_empty() => Targets::from_str(&spec).unwrap_or_else(|e| {
            eprintln!("ray: RUST_LOG={spec:?} is not a log filter ({e}); using {default}");
            fallback()
        }),
        _ => fallback(),
    }
}

static FORMAT: std::sync::OnceLock<LogFormat> = std::sync::OnceLock::new();

/// The format [`init`] chose (text before it ran): what this process passes on to the VMMs
/// it starts.
pub fn format() -> LogFormat {
    FORMAT.get().copied().unwrap_or_default()
}

/// Installs the process's log subscriber (stderr, `format`, filtered by `RUST_LOG` or
/// `default`). A second call does nothing.
pub fn init(format: LogFormat, default: &str) {
    if FORMAT.set(format).is_err() {
        return;
    }
    let filter = filter_from_env(default);
    let layer = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .with_writer(std::io::stderr)
            .boxed(),
    };
    let _ = tracing_subscriber::registry()
        .with(layer.with_filter(filter))
        .try_init();
}

/// Starts a thread from the builder that runs `f` inside the spans current where it is
/// called: `Builder::new().name(..).spawn_in_span(f)`.
pub trait SpawnInSpan {
    fn spawn_in_span<F, T>(self, f: F) -> std::io::Result<JoinHandle<T>>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static;
}

impl SpawnInSpan for Builder {
    fn spawn_in_span<F, T>(self, f: F) -> std::io::Result<JoinHandle<T>>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let span = tracing::Span::current();
        self.spawn(move || span.in_scope(f))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_parse_by_name_and_refuse_others_naming_them() {
        for name in LogFormat::NAMES {
            assert_eq!(name.parse::<LogFormat>().unwrap().name(), name);
        }
        let e = "yaml".parse::<LogFormat>().unwrap_err();
        assert!(e.contains("'yaml'") && e.contains("text, json"), "{e}");
    }

    #[test]
    fn a_thread_started_with_spawn_runs_in_the_callers_span() {
        use std::sync::{Arc, Mutex};
        use tracing::dispatcher::with_default;
        // A subscriber that records the name of the span current at each event.
        let seen = Arc::new(Mutex::new(Vec::new()));
        struct Record(Arc<Mutex<Vec<String>>>);
        impl<S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>>
            tracing_subscriber::Layer<S> for Record
        {
            fn on_event(
                &self,
                _event: &tracing::Event<'_>,
                ctx: tracing_subscriber::layer::Context<'_, S>,
            ) {
                let name = ctx
                    .lookup_current()
                    .map_or("none".to_string(), |s| s.name().to_string());
                self.0.lock().unwrap().push(name);
            }
        }
        let subscriber = tracing_subscriber::registry().with(Record(seen.clone()));
        let dispatch = tracing::Dispatch::new(subscriber);
        with_default(&dispatch.clone(), || {
            let span = tracing::info_span!("vm", id = "t");
            let _g = span.enter();
            let d = dispatch.clone();
            Builder::new()
                .spawn_in_span(move || {
                    tracing::dispatcher::with_default(&d, || tracing::info!("inside"))
                })
                .unwrap()
                .join()
                .unwrap();
            std::thread::spawn(move || {
                tracing::dispatcher::with_default(&dispatch, || tracing::info!("outside"))
            })
            .join()
            .unwrap();
        });
        assert_eq!(*seen.lock().unwrap(), ["vm", "none"]);
    }
}
