//! Checkers for the protocol: they drive [`crate::Block`]s directly, without any runtime.
//!
//! - [`Machine`] executes actions against a simulated machine whose memories hold *versions*
//!   (every write makes a new one), and checks after every single action that no processor can
//!   read a stale value and no copy the engine calls valid is stale.
//! - [`World`] ties blocks, machines, device capacity and outstanding requests together, and
//!   checks the cross-block invariants after every event.
//! - [`explore`] enumerates every reachable state of a small world (exhaustive model checking).
//! - [`random`] runs long random event sequences against a plain oracle (differential testing).
//! - [`file`] checks, one level up, the file mapping's procedures (write-back, `sync`, errors,
//!   the lease and its break) against a two-level file (page cache and disk) and other writers.

mod machine;
mod world;

pub mod explore;
pub mod file;
pub mod random;

pub use machine::{Machine, Violation};
pub use world::{Outstanding, World};
