//! Device backends: the trait every device memory implements (the only path to device memory
//! and the keeper of the device's page tables), the simulated backend, and the runtime's
//! per-device state.

mod backend;
mod sim;
mod state;

pub use backend::{BlockPageTable, Chunk, CopyOp, DeviceBackend, Endpoint, Fence, Pte};
pub use sim::{BytePageTable, SimBackend};
pub use state::DeviceCounters;
pub(crate) use state::DeviceState;
