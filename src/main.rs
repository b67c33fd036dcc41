//! The `sse-gateway` binary: loads the configuration, starts logging and a runtime, runs the gateway.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use sse_gateway::config::Config;

/// jemalloc, for memory: each stream's long-lived objects are allocated among short-lived ones
/// (the request, its headers, the token), and glibc's heap keeps the holes those leave. Measured
/// with 10,000 idle streams: 4.2 KiB of RSS per stream with glibc, 2.7 KiB with jemalloc.
#[cfg(not(feature = "system-allocator"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    // Before the runtime exists: dotenvy sets environment variables, which is unsound once other
    // threads run.
    let config = match Config::load() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(78); // EX_CONFIG
        }
    };
    sse_gateway::logging::init(config.mode);
    for warning in &config.warnings {
        tracing::warn!("{warning}");
    }
    // Also before the runtime: growing the file table is only free while there is one thread.
    let fds = sse_gateway::fds::prepare();
    tracing::info!(
        open_files_soft = fds.limit,
        open_files_hard = fds.hard_limit,
        file_table = fds.reserved,
        "file descriptors"
    );
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let public = match sse_gateway::http::server::listen(config.listen) {
            Ok(l) => l,
            Err(e) => {
                // The usual cause on a first run: another program (or gateway) has the port.
                let hint = if e.kind() == std::io::ErrorKind::AddrInUse {
                    " (set APP_PORT to another port)"
                } else {
                    ""
                };
                eprintln!("cannot listen on {}: {e}{hint}", config.listen);
                return ExitCode::FAILURE;
            }
        };
        let operator = match config.operator_listen {
            None => None,
            Some(addr) => match tokio::net::TcpListener::bind(addr).await {
                Ok(l) => Some(l),
                Err(e) => {
                    // A second gateway on the same host needs an operator address of its own too.
                    eprintln!(
                        "cannot listen on {addr} (the operator listener): {e} \
                         (set OPERATOR_ADDR to another address, or to off)"
                    );
                    return ExitCode::FAILURE;
                }
            },
        };
        let listeners = sse_gateway::Listeners { public, operator };
        match sse_gateway::run(config, listeners, sse_gateway::shutdown::signal()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        }
    })
}
