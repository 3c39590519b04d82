//! The memory manager: mechanism only. It serves faults and requests by driving each block's
//! protocol engine and executing what it says; placement comes from `crate::policy`.

pub(crate) mod cache;
pub(crate) mod completions;
pub(crate) mod exec;
pub(crate) mod fault;
pub(crate) mod file_io;
pub(crate) mod flusher;
pub(crate) mod fork;
pub(crate) mod gate;
pub(crate) mod kernel_cpu;
pub(crate) mod kernel_runs;
pub(crate) mod launch;
pub(crate) mod lease_break;
pub(crate) mod leases;
pub(crate) mod lifecycle;
pub(crate) mod ops;
pub(crate) mod parked;
pub(crate) mod pin;
pub(crate) mod placement;
pub(crate) mod poison;
pub(crate) mod region;
pub(crate) mod request;
pub(crate) mod revalidate;
pub(crate) mod runtime;
pub(crate) mod service;
pub(crate) mod space;
pub(crate) mod testing;
pub(crate) mod work;
pub(crate) mod writeback;
