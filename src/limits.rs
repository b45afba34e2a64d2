//! Process settings the server makes for itself at start: the open-file limit, and how the
//! allocator hands large buffers back.
//!
//! Every client, pending handshake and metrics connection is a descriptor, and most systems
//! start a process with a soft limit of 1024 while allowing far more. The server raises its
//! soft limit to the hard one and logs what it got, so the connection limits
//! (`--max-clients`, `--max-handshakes`) and not the descriptor table decide who is served.

/// The open-file limit before and after [`raise_open_file_limit`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OpenFileLimit {
    /// The soft limit found at start.
    pub before: u64,
    /// The soft limit the process runs with.
    pub now: u64,
    /// The hard limit.
    pub hard: u64,
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit. Returns `None` when the limit cannot
/// be read.
pub fn raise_open_file_limit() -> Option<OpenFileLimit> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return None;
    }
    let before = limit.rlim_cur;
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit reads the struct we pass; raising the soft limit up to the hard
        // one needs no privilege.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit.rlim_cur = limit.rlim_max;
        }
    }
    Some(OpenFileLimit {
        before,
        now: limit.rlim_cur,
        hard: limit.rlim_max,
    })
}

/// Raises the open-file limit and logs the outcome; returns the soft limit in force.
pub fn raise_and_log_open_file_limit() -> Option<u64> {
    let Some(limit) = raise_open_file_limit() else {
        tracing::warn!(
            "cannot read the open-file limit: {}",
            std::io::Error::last_os_error()
        );
        return None;
    };
    if limit.now > limit.before {
        tracing::info!(
            "open-file limit raised from {} to {} (the hard limit)",
            limit.before,
            limit.now
        );
    } else if limit.now < limit.hard {
        tracing::warn!(
            "open-file limit stays at {} (cannot raise it to the hard limit {})",
            limit.now,
            limit.hard
        );
    } else {
        tracing::info!("open-file limit: {} (the hard limit)", limit.now);
    }
    Some(limit.now)
}

/// Buffers at least this large are mapped on their own and unmapped when freed. glibc
/// otherwise raises this threshold as large buffers are freed (up to 32 MiB), after which
/// backlogs grow on the heap and the pages of closed clients' buffers stay resident: measured
/// here with 400 stalled clients and a 256 MiB output budget, peak RSS 655 MB with glibc's
/// default, 375-430 MB with 256 KiB, 358 MB with 64 KiB.
pub const MMAP_THRESHOLD: i32 = 64 << 10;

/// Fixes glibc's mmap threshold at [`MMAP_THRESHOLD`], so the memory of a closed client's
/// backlog goes back to the system at once.
pub fn return_large_buffers_at_once() {
    // SAFETY: mallopt only changes allocator tuning.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_soft_limit_ends_at_the_hard_one() {
        let limit = raise_open_file_limit().expect("readable");
        assert_eq!(limit.now, limit.hard);
        assert!(limit.now >= limit.before);
    }
}
