//! # hetmem-proto: the coherence protocol, sans IO
//!
//! One [`Block`] holds the state of a 2 MiB block of 4 KiB pages: which memories hold a valid
//! copy, how each processor maps each page, what is dirty against the file, and what is in flight.
//! It takes [`Event`]s and returns [`Action`]s; it makes no syscall, spawns no thread and has no
//! `unsafe`. The runtime executes the actions (userfaultfd, copies, device page tables, file I/O)
//! and reports completions back. Each block decides alone, so blocks lock separately; the only
//! shared thing, device capacity, is behind [`FrameBudget`].
//!
//! The specification is `docs/protocol.md`. [`model`] holds the checkers: a simulated machine
//! that executes actions against versioned data, an exhaustive explorer and a random
//! differential driver.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod action;
mod bitmap;
mod block;
mod budget;
mod config;
mod error;
mod event;
mod ids;
pub mod model;
mod state;

pub use action::{Action, MapMode, Source};
pub use bitmap::{PageMask, Runs};
pub use block::{Block, Block2M, Env, Layout};
pub use budget::{FrameBudget, FrameCounts};
pub use config::{DeviceKind, Mutation, Policy, TooManyDevices, Topology};
pub use error::{EventError, InvariantViolation, RequestError};
pub use event::{Access, Advice, Event, Invalidation, OpError, RequestKind};
pub use ids::{
    DeviceId, Mem, OpId, PageRun, Proc, ReqId, BLOCK_BYTES, BLOCK_WORDS, MAX_DEVICES, MAX_MEMS,
    MAX_PROCS, PAGES_PER_BLOCK, PAGE_SIZE,
};
pub use state::{BlockState, PageView};
