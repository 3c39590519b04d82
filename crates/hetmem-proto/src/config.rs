//! The topology and policy an engine decides against. Shared by all blocks, read-only.

use crate::ids::{DeviceId, MAX_DEVICES};

/// How the CPU may reach a device's memory.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum DeviceKind {
    /// Like `MEMORY_DEVICE_PRIVATE`: the CPU can never map it. A CPU access migrates the page back.
    Private,
    /// Like `MEMORY_DEVICE_COHERENT`: the CPU maps the device's frames directly.
    Coherent,
}

/// Decision knobs. Tuning comes later; these are the ones the protocol itself needs.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct Policy {
    /// A CPU fault also fills and maps this many pages around the faulting one (aligned window,
    /// only pages that need a fill from nothing), as the kernel's fault-around does. 1 disables it.
    pub cpu_fault_around: u16,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            cpu_fault_around: 16,
        }
    }
}

/// A deliberate protocol bug. It can be switched on only with the `mutants` feature (tests). The
/// model checker must find a counterexample for each one; that is how we know it can fail.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Mutation {
    /// Let the CPU map a page that lives only in private device memory.
    MapPrivateOnCpu,
    /// Drop device copies without first invalidating device mappings of them.
    SkipInvalidation,
    /// On eviction, free the device frame of a dirty page even when it holds the only copy.
    DropDirtyOnEvict,
    /// Let `Invalidate { Extend }` clear the end of file at once, without waiting for earlier
    /// requests (a truncation's drop, a flush) on its pages.
    ExtendAtOnce,
}

/// Devices and policy.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct Topology {
    kinds: Vec<DeviceKind>,
    /// Policy knobs.
    pub policy: Policy,
    #[cfg(feature = "mutants")]
    #[doc(hidden)]
    pub mutation: Option<Mutation>,
}

/// A topology with more than [`MAX_DEVICES`] devices.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0} devices requested, at most {MAX_DEVICES} are supported")]
pub struct TooManyDevices(pub usize);

impl Topology {
    /// A topology with these devices, `DeviceId(i)` having `kinds[i]`.
    pub fn new(kinds: Vec<DeviceKind>) -> Result<Self, TooManyDevices> {
        if kinds.len() > MAX_DEVICES {
            return Err(TooManyDevices(kinds.len()));
        }
        Ok(Self {
            kinds,
            policy: Policy::default(),
            #[cfg(feature = "mutants")]
            mutation: None,
        })
    }

    /// Number of devices.
    pub fn device_count(&self) -> usize {
        self.kinds.len()
    }

    /// The devices.
    pub fn devices(&self) -> impl Iterator<Item = DeviceId> + Clone {
        DeviceId::range(self.kinds.len())
    }

    /// The kind of `dev`; `None` if it is not part of the topology.
    pub fn kind(&self, dev: DeviceId) -> Option<DeviceKind> {
        self.kinds.get(dev.index()).copied()
    }

    /// Whether `dev` exists and is coherent.
    pub fn is_coherent(&self, dev: DeviceId) -> bool {
        self.kind(dev) == Some(DeviceKind::Coherent)
    }

    /// Whether any test-only mutant is switched on.
    pub(crate) fn has_mutation(&self) -> bool {
        #[cfg(feature = "mutants")]
        return self.mutation.is_some();
        #[cfg(not(feature = "mutants"))]
        false
    }

    /// Whether the test-only mutant `m` is switched on. Always false without `mutants`.
    #[inline(always)]
    pub(crate) fn mutated(&self, m: Mutation) -> bool {
        #[cfg(feature = "mutants")]
        return self.mutation == Some(m);
        #[cfg(not(feature = "mutants"))]
        {
            let _ = m;
            false
        }
    }
}
