//! Device backends: the trait every device memory implements (the only path to device memory),
//! the simulated backend, and the runtime's per-device state.

mod backend;
mod sim;
mod state;

pub use backend::{Chunk, CopyOp, DeviceBackend, Endpoint, Fence};
pub use sim::SimBackend;
pub use state::DeviceCounters;
pub(crate) use state::DeviceState;
