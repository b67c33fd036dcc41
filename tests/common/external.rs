//! Helpers for tests that drive external programs (nginx, newman, schemathesis, Chromium, Node).
//! `.ci/install-tools` (run by `make test`) installs them; a missing one fails the test, loudly.

use std::path::PathBuf;

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Finds an executable on PATH or in `tests/node/node_modules/.bin`; panics with the fix otherwise.
pub fn tool(name: &str) -> PathBuf {
    let node_bin = repo().join("tests/node/node_modules/.bin").join(name);
    if node_bin.exists() {
        return node_bin;
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!("`{name}` is not installed: run `make tools` (or .ci/install-tools)");
}

/// Runs `cmd` in `dir` with its stdout and stderr captured together, killed with everything it
/// started (its process group) if it outlasts `limit`. Returns whether it succeeded and what it
/// printed.
pub async fn run_bounded(
    mut cmd: std::process::Command,
    dir: &std::path::Path,
    limit: std::time::Duration,
) -> (bool, String) {
    use std::os::unix::process::CommandExt;
    use std::process::Stdio;
    let name = cmd.get_program().to_string_lossy().into_owned();
    let out_path = dir.join("command.out");
    let out = std::fs::File::create(&out_path).expect("output file");
    let err = out.try_clone().expect("output file");
    let mut child = cmd
        .current_dir(dir)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("start {name}: {e}"));
    let deadline = std::time::Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for the child") {
            break Some(status);
        }
        if std::time::Instant::now() > deadline {
            // A wrapper (make, a shell, a test runner) would leave its own children running.
            let _ = std::process::Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", child.id())])
                .stderr(Stdio::null())
                .status();
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    let output = std::fs::read_to_string(&out_path).unwrap_or_default();
    match status {
        Some(s) => (s.success(), output),
        None => (false, format!("{name} killed after {limit:?}\n{output}")),
    }
}

/// Spawns `cmd` (whose stdout and stdin the caller sets up, stdout piped) and streams its stdout
/// lines through a channel, read on a thread so that a silent child never blocks the test.
pub fn spawn_lines(
    mut cmd: std::process::Command,
) -> (
    std::process::Child,
    tokio::sync::mpsc::UnboundedReceiver<String>,
) {
    use std::io::BufRead;
    let mut child = cmd.spawn().expect("spawn the child");
    let stdout = child.stdout.take().expect("stdout piped");
    let (tx, lines) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (child, lines)
}

/// A file of the repository, as text.
pub fn read(path: &str) -> String {
    std::fs::read_to_string(repo().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// A finished command's status and output, for failure messages.
pub fn output_text(out: &std::process::Output) -> String {
    format!(
        "status {}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// "10s", "1h", "500ms", "20s" (nginx and Compose durations) in seconds.
pub fn seconds(v: &str) -> f64 {
    let i = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let n: f64 = v[..i].parse().unwrap_or_else(|_| panic!("duration {v:?}"));
    n * match &v[i..] {
        "ms" => 0.001,
        "" | "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        "d" => 86400.0,
        u => panic!("duration unit {u:?} in {v:?}"),
    }
}
