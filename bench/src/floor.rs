//! `sse-bench floor`: what the kernel alone charges for a delivery. One process writes a small
//! message to each of N loopback sockets, as a server fans out a broadcast; a second process (this
//! binary again, `floor-reader`) reads them all through epoll, as a client tool does. No server
//! logic at all: the writer's CPU per write is the floor under any server's CPU per delivery on
//! this machine, and the time to write one message to all N the floor under its fan-out latency.
//!
//! `--shuffle` writes the sockets in a random order instead of the order they were created in,
//! as a server iterating a hash map of its connections would: it shows what memory locality in
//! the kernel's per-socket structures is worth.
//!
//! Loopback only, bounded in count and time like every other command of the tool.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;

/// The reader gives up after this long without a byte.
const READER_IDLE: Duration = Duration::from_secs(10);

#[derive(Debug, Serialize)]
pub struct Floor {
    pub streams: usize,
    pub messages: usize,
    pub bytes_per_message: usize,
    pub rate: f64,
    /// Sockets written in a random order rather than the order they were created in.
    pub shuffled: bool,
    /// Writer CPU (user + system) per write, microseconds.
    pub writer_cpu_us_per_write: f64,
    pub writer_sys_share: f64,
    /// Reader CPU per message read, microseconds.
    pub reader_cpu_us_per_message: f64,
    /// Wall time to write one message to every stream: median and worst, milliseconds.
    pub fanout_ms_p50: f64,
    pub fanout_ms_max: f64,
}

/// (user, system) CPU seconds of this process.
fn cpu() -> (f64, f64) {
    // SAFETY: getrusage only writes the struct passed to it.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    (secs(u.ru_utime), secs(u.ru_stime))
}

/// The writer: listens, starts the reader, writes `messages` messages to every stream at `rate`.
pub fn run(
    streams: usize,
    messages: usize,
    rate: f64,
    bytes: usize,
    shuffle: bool,
) -> Result<Floor, String> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let port = listener.local_addr().map_err(|e| e.to_string())?.port();
    let total = (streams * messages * bytes) as u64;
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let reader = Command::new(exe)
        .args(["floor-reader", "--port", &port.to_string()])
        .args([
            "--streams",
            &streams.to_string(),
            "--total",
            &total.to_string(),
        ])
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("starting the reader: {e}"))?;
    let mut conns = Vec::with_capacity(streams);
    for _ in 0..streams {
        let (s, _) = listener.accept().map_err(|e| e.to_string())?;
        s.set_nodelay(true).map_err(|e| e.to_string())?;
        conns.push(s);
    }
    std::thread::sleep(Duration::from_millis(300)); // let the reader settle into epoll_wait
    if shuffle {
        // Fisher-Yates with a fixed xorshift: the same order every run.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for i in (1..conns.len()).rev() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            conns.swap(i, (x % (i as u64 + 1)) as usize);
        }
    }
    let message = vec![b'x'; bytes];
    let period = Duration::from_secs_f64(1.0 / rate);
    let mut fanouts = Vec::with_capacity(messages);
    let (u0, s0) = cpu();
    let start = Instant::now();
    for m in 0..messages {
        let t = Instant::now();
        for c in &mut conns {
            c.write_all(&message).map_err(|e| format!("write: {e}"))?;
        }
        fanouts.push(t.elapsed().as_secs_f64() * 1000.0);
        let next = start + period * (m as u32 + 1);
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    }
    let (u1, s1) = cpu();
    let out = reader.wait_with_output().map_err(|e| e.to_string())?;
    let reader_cpu: f64 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .map_err(|_| "the reader did not report".to_string())?;
    fanouts.sort_by(f64::total_cmp);
    let writes = (streams * messages) as f64;
    let writer = (u1 - u0) + (s1 - s0);
    Ok(Floor {
        streams,
        messages,
        bytes_per_message: bytes,
        rate,
        shuffled: shuffle,
        writer_cpu_us_per_write: round(writer / writes * 1e6),
        writer_sys_share: round((s1 - s0) / writer.max(f64::EPSILON)),
        reader_cpu_us_per_message: round(reader_cpu / writes * 1e6),
        fanout_ms_p50: round(fanouts[fanouts.len() / 2]),
        fanout_ms_max: round(fanouts.last().copied().unwrap_or_default()),
    })
}

fn round(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// The reader: connects `streams` sockets, reads `total` bytes through one epoll instance, prints
/// its CPU seconds for the reading.
pub fn read(port: u16, streams: usize, total: u64) -> Result<(), String> {
    let mut conns = Vec::with_capacity(streams);
    for _ in 0..streams {
        let s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
        s.set_nonblocking(true).map_err(|e| e.to_string())?;
        conns.push(s);
    }
    // SAFETY: plain epoll calls on descriptors this function owns; `events` outlives every call.
    let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if ep < 0 {
        return Err("epoll_create1 failed".into());
    }
    for (i, c) in conns.iter().enumerate() {
        let mut ev = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLET) as u32,
            u64: i as u64,
        };
        if unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, c.as_raw_fd(), &mut ev) } != 0 {
            return Err("epoll_ctl failed".into());
        }
    }
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = 0u64;
    let mut first: Option<(f64, f64)> = None;
    let mut last_byte = Instant::now();
    while got < total && last_byte.elapsed() < READER_IDLE {
        let n = unsafe { libc::epoll_wait(ep, events.as_mut_ptr(), events.len() as i32, 1000) };
        for ev in events.iter().take(n.max(0) as usize) {
            let Some(c) = conns.get_mut(ev.u64 as usize) else {
                continue;
            };
            // Edge-triggered: read until the socket is empty.
            while let Ok(k) = c.read(&mut buf) {
                if k == 0 {
                    break;
                }
                first.get_or_insert_with(cpu);
                got += k as u64;
                last_byte = Instant::now();
            }
        }
    }
    let (u0, s0) = first.unwrap_or_else(cpu);
    let (u1, s1) = cpu();
    println!("{}", (u1 - u0) + (s1 - s0));
    Ok(())
}
