//! Log output: human-readable in `APP_MODE=debug`, JSON lines in `production`; `RUST_LOG` overrides
//! the level filter.

use tracing_subscriber::EnvFilter;

use crate::config::Mode;

pub fn init(mode: Mode) {
    let default = match mode {
        Mode::Debug => "debug,fred=info,hyper=info,h2=info",
        Mode::Production => "info,fred=warn",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    let _ = match mode {
        Mode::Debug => builder.try_init(),
        Mode::Production => builder.json().flatten_event(true).try_init(),
    };
}
