//! Other processes for the integration tests: forked children, the pipes they report through,
//! and their wait statuses.

use std::fs::File;
use std::os::fd::{FromRawFd, OwnedFd};

use libc::c_int;

/// Exit code of a forked child whose code panicked.
pub const CHILD_PANICKED: c_int = 99;

pub fn last_os_error() -> std::io::Error {
    std::io::Error::last_os_error()
}

/// A pipe; both ends close on drop.
pub fn pipe() -> (File, File) {
    let mut fds = [0 as c_int; 2];
    // SAFETY: `fds` is a valid array of two ints for the kernel to fill.
    let r = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(r, 0, "pipe2: {}", last_os_error());
    // SAFETY: both descriptors were just created by pipe2 and are owned by nobody else.
    let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    (File::from(rd), File::from(wr))
}

/// `fork()`. The child runs `child` and `_exit`s with its result (a panic is
/// `CHILD_PANICKED`); the parent gets the pid. The child must not use the parent's `Hetmem`
/// context (it may build one of its own).
pub fn fork_child(child: impl FnOnce() -> c_int) -> libc::pid_t {
    // SAFETY: the child runs only `child`, which each caller limits to what its test allows a
    // fork child of this process, then calls `_exit`.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        let code =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(child)).unwrap_or(CHILD_PANICKED);
        // SAFETY: ends the child at once, without running destructors or atexit handlers that
        // belong to the parent's state.
        unsafe { libc::_exit(code) }
    }
    assert!(pid > 0, "fork: {}", last_os_error());
    pid
}

/// A wait status in words.
pub fn describe_status(status: c_int) -> String {
    if libc::WIFEXITED(status) {
        format!("exit code {}", libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        format!("killed by signal {}", libc::WTERMSIG(status))
    } else {
        format!("status {status:#x}")
    }
}

/// The exit code of a child that must exit normally.
#[track_caller]
pub fn exit_code(status: c_int) -> c_int {
    assert!(
        libc::WIFEXITED(status),
        "child did not exit normally: {}",
        describe_status(status)
    );
    libc::WEXITSTATUS(status)
}
