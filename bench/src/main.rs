//! `sse-bench`: a load generator for Server-Sent Events servers. This module owns the process:
//! argument parsing, the tokio runtime, the hard time limit, and printing the one JSON summary.
//!
//! See `docs/benchmarks.md` for the scenarios and how to run them.

// The gateway's start-up code for the open-file limit, compiled here from its one file: the tool
// measures any SSE server and needs nothing else of the gateway (nor the gateway's other uses of
// that file).
mod cli;
mod conn;
#[allow(dead_code)]
#[path = "../../src/fds.rs"]
mod fds;
mod floor;
mod http;
mod procfs;
mod publish;
mod report;
mod runner;
mod sse;
mod target;
mod token;
mod track;

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

use cli::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run(*args),
        Command::Merge { files, label, out } => merge(&files, label, out.as_deref()),
        Command::Floor {
            streams,
            messages,
            rate,
            bytes,
            shuffle,
        } => run_floor(streams, messages, rate, bytes, shuffle),
        Command::FloorReader {
            port,
            streams,
            total,
        } => floor::read(port, streams as usize, total),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sse-bench: {e}");
            ExitCode::from(2)
        }
    }
}

fn run(args: cli::RunArgs) -> Result<(), String> {
    args.validate()?;
    // Before any thread: the open-file limit up, and the file table grown once for it (growing it
    // later, with threads, stalls the connect that needs it; see the gateway's src/fds.rs).
    let fds = fds::prepare();
    // Every phase has its own deadline; this is the backstop if something still hangs.
    let max_run = Duration::from_secs_f64(args.max_run);
    std::thread::spawn(move || {
        std::thread::sleep(max_run);
        eprintln!("sse-bench: --max-run of {max_run:?} reached, exiting without a summary");
        std::process::exit(3);
    });
    let runtime = if args.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.threads)
            .enable_all()
            .build()
    }
    .map_err(|e| format!("runtime: {e}"))?;
    let argv: Vec<String> = std::env::args().collect();
    let out = args.out.clone();
    let summary = runtime.block_on(runner::run(args, argv, fds))?;

    // Connections still held by aborted tasks are closed with the runtime, without waiting.
    runtime.shutdown_background();
    emit(&summary, out.as_deref())
}

fn run_floor(
    streams: u32,
    messages: u32,
    rate: f64,
    bytes: u32,
    shuffle: bool,
) -> Result<(), String> {
    if !(rate > 0.0 && rate <= 10_000.0) || f64::from(messages) / rate > 600.0 {
        return Err("--rate must be above 0 and at most 10000, and the run at most 600 s".into());
    }
    let fds = fds::prepare();
    if u64::from(streams) + 64 > fds.limit {
        return Err(format!(
            "{streams} sockets but only {} file descriptors",
            fds.limit
        ));
    }
    let floor = floor::run(
        streams as usize,
        messages as usize,
        rate,
        bytes as usize,
        shuffle,
    )?;
    let json = serde_json::to_string_pretty(&floor).map_err(|e| e.to_string())?;
    println!("{json}");
    Ok(())
}

fn merge(
    files: &[std::path::PathBuf],
    label: Option<String>,
    out: Option<&std::path::Path>,
) -> Result<(), String> {
    let mut parts = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(f).map_err(|e| format!("{}: {e}", f.display()))?;
        let s: report::Summary =
            serde_json::from_str(&text).map_err(|e| format!("{}: {e}", f.display()))?;
        parts.push(s);
    }
    let mut merged = report::merge(&parts)?;
    if let Some(l) = label {
        merged.tool.label = l;
    }
    emit(&merged, out)
}

fn emit(summary: &report::Summary, out: Option<&std::path::Path>) -> Result<(), String> {
    let json = serde_json::to_string_pretty(summary).map_err(|e| e.to_string())?;
    if let Some(path) = out {
        std::fs::write(path, format!("{json}\n"))
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    println!("{json}");
    Ok(())
}
