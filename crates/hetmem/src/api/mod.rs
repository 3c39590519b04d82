//! The public handles: the context and its builder, managed buffers, devices and file mappings.
//! They hold no state beyond the runtime and their region; every mechanism is in `crate::mm`.

pub(crate) mod buffer;
pub(crate) mod device;
pub(crate) mod file;
pub(crate) mod hetmem;
pub(crate) mod launch;
pub(crate) mod pin;
pub(crate) mod testing;
