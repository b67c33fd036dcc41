//! File descriptors: the open-file limit raised to what the system allows, and the kernel's file
//! table sized for it once, at start-up, before any thread exists.
//!
//! Every stream is a socket, so the soft `RLIMIT_NOFILE` (often 1024) would cap a gateway far below
//! what the machine can hold. And the kernel grows a process's file table by doubling it; in a
//! multi-threaded process each growth waits for an RCU grace period (`expand_fdtable` calls
//! `synchronize_rcu`), which stalls the `accept` that caused it for tens of milliseconds. Measured
//! here: every connect in flight at 256, 512, 1024, ... open files took 15-22 ms instead of 0.3.
//! Growing the table once, while the process is still single-threaded, costs nothing of the kind.
//!
//! Its libc calls are `unsafe`, as are [`crate::sched`]'s; every other module is compiled with
//! `unsafe_code` denied.
#![allow(unsafe_code)]

/// Largest file table reserved up front (the kernel keeps 8 bytes per slot, plus bitmaps).
pub const MAX_RESERVE: u64 = 1 << 18;

/// What [`prepare`] achieved.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Fds {
    /// The soft open-file limit now in force.
    pub limit: u64,
    /// The hard limit (the ceiling of `limit`).
    pub hard_limit: u64,
    /// File table slots reserved.
    pub reserved: u64,
}

/// Raises the soft open-file limit to the hard limit and grows the file table to hold it (up to
/// [`MAX_RESERVE`]). Call it before starting threads: it is safe at any time, but only then does
/// the growth cost nothing. Failures only mean the defaults stay.
#[cfg(unix)]
pub fn prepare() -> Fds {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed to them.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return Fds::default();
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim = raised;
            }
        }
    }
    #[allow(clippy::unnecessary_cast)] // rlim_t is u64 on 64-bit Linux, not everywhere
    let (limit, hard_limit) = (lim.rlim_cur as u64, lim.rlim_max as u64);
    let reserved = reserve(limit.min(MAX_RESERVE));
    Fds {
        limit,
        hard_limit,
        reserved,
    }
}

#[cfg(not(unix))]
pub fn prepare() -> Fds {
    Fds::default()
}

/// The soft open-file limit in force, if it is finite.
#[cfg(unix)]
pub fn open_files_limit() -> Option<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct passed to it.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return None;
    }
    #[allow(clippy::unnecessary_cast)] // rlim_t is u64 on 64-bit Linux, not everywhere
    (lim.rlim_cur != libc::RLIM_INFINITY).then_some(lim.rlim_cur as u64)
}

#[cfg(not(unix))]
pub fn open_files_limit() -> Option<u64> {
    None
}

/// Most streams an instance holds: `configured` (0: no cap of its own), and in any case
/// `reserve` descriptors short of the open-file limit, so that accepting, `/health`, the broker's
/// reconnects and refusals with a `retry:` keep working when streams have taken the rest.
pub fn stream_cap(configured: usize, limit: Option<u64>, reserve: u64) -> usize {
    let by_files = limit.map_or(usize::MAX, |l| {
        usize::try_from(l.saturating_sub(reserve))
            .unwrap_or(usize::MAX)
            .max(1)
    });
    match configured {
        0 => by_files,
        n => n.min(by_files),
    }
}

/// Grows the file table to `slots` by duplicating a descriptor onto the lowest free number at or
/// above the last slot (`F_DUPFD`, which never touches a descriptor in use, whatever other threads
/// do) and closing it again: the table never shrinks. Returns the slots reserved (0 if it could
/// not be done).
#[cfg(unix)]
fn reserve(slots: u64) -> u64 {
    use std::os::fd::AsRawFd;
    let Ok(target) = libc::c_int::try_from(slots.saturating_sub(1)) else {
        return 0;
    };
    let Ok(null) = std::fs::File::open("/dev/null") else {
        return 0;
    };
    if target <= null.as_raw_fd() {
        return 0;
    }
    // SAFETY: F_DUPFD allocates a new descriptor (the lowest free one >= target) for the file
    // `null` holds open; the new descriptor is ours alone and is closed right after.
    let copy = unsafe { libc::fcntl(null.as_raw_fd(), libc::F_DUPFD, target) };
    if copy == -1 {
        return 0;
    }
    // SAFETY: `copy` was just allocated above and nothing else knows of it.
    unsafe { libc::close(copy) };
    slots
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    /// The kernel's table size for this process, as `/proc/self/status` reports it.
    fn fd_table_size() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("FDSize:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap()
    }

    #[test]
    fn the_soft_limit_is_raised_to_the_hard_one() {
        let fds = super::prepare();
        // Equal where the hard limit is finite; an unlimited hard limit cannot be reached.
        assert!(fds.limit > 0 && fds.limit <= fds.hard_limit, "{fds:?}");
        assert!(fd_table_size() >= fds.reserved);
    }

    #[test]
    fn streams_leave_a_reserve_of_descriptors() {
        use super::stream_cap;
        assert_eq!(stream_cap(0, Some(1024), 256), 768);
        assert_eq!(stream_cap(100, Some(1024), 256), 100);
        assert_eq!(stream_cap(5000, Some(1024), 256), 768);
        assert_eq!(stream_cap(0, None, 256), usize::MAX);
        assert_eq!(
            stream_cap(0, Some(10), 256),
            1,
            "never zero: one stream can always try"
        );
    }

    #[test]
    fn the_file_table_is_grown_once_up_front() {
        let before = fd_table_size();
        let want = (before * 4).max(1024);
        assert_eq!(super::reserve(want), want);
        assert!(fd_table_size() >= want, "{} < {want}", fd_table_size());
    }
}
