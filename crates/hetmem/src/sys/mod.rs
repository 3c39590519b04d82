//! System calls: the only code that calls the kernel through rustix or libc (above it, the
//! runtime does file I/O with std's `File` and nothing else). rustix where it has the call;
//! libc where it has none: `pthread_atfork`, signals and `fcntl` leases, `process_vm_readv`/
//! `writev`, `dup3` onto a descriptor a `File` owns, `sync_file_range`, `sysinfo`, and the
//! userfaultfd (and its epoll wait and reads) and `PROCMAP_QUERY` ioctls. Everything above calls
//! the wrappers here. Those that take raw addresses (mappings, madvise, mprotect, munmap,
//! copies) are unsafe; their callers opt in to unsafe code function by function.

pub mod atfork;
pub mod file;
pub mod lease;
pub mod mem;
pub mod uffd;
