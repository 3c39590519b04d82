//! The only place that talks to the kernel: userfaultfd ioctls and memory-management syscalls.
//! Everything above works with the safe wrappers here.

pub mod atfork;
pub mod file;
pub mod lease;
pub mod mem;
pub mod uffd;
