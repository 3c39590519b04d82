//! Thrashing detection and mitigation, per 2 MiB block, as UVM's `perf_thrashing` module does:
//! a block whose data keeps moving between the CPU and a device is pinned to system memory for
//! a while, and devices map it remotely (they reach system memory over the link) instead of
//! migrating it; then the pin is lifted and the block re-evaluated.
//!
//! A *flip* is a fault that moves the block's data to the other side: a CPU fault on data that
//! lives only in private device memory, or a device fault on data that is in system memory and
//! not on that device. `threshold` flips within `window` engage the pin: with the default 4, two
//! round trips (UVM's defaults need several round trips per page over milliseconds). The pin is
//! carried out as advice (`PreferredLocation(System)`), so it cannot break coherence; a block
//! the application advised itself is left alone.

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::time::{Duration, Instant};

/// The side a block's data was last moved to.
const NOBODY: u8 = 0;
const CPU: u8 = 1;
/// Device `d` is `DEVICE + d`.
const DEVICE: u8 = 2;

/// Settings of the detector.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ThrashingConfig {
    /// Flips within `window` that make a block thrashing (at least 2).
    pub threshold: u32,
    /// How close together the flips must be.
    pub window: Duration,
    /// How long a thrashing block stays pinned to system memory before it is re-evaluated.
    pub pin: Duration,
}

impl Default for ThrashingConfig {
    fn default() -> Self {
        Self {
            threshold: 4,
            window: Duration::from_millis(50),
            pin: Duration::from_millis(100),
        }
    }
}

/// Per-block state (in `PolicyBlock::extra`, through the default policy's slot).
#[derive(Debug, Default)]
pub struct ThrashingBlock {
    owner: AtomicU8,
    flips: AtomicU32,
    /// When the current run of flips began (nanoseconds since the detector was made).
    first_flip: AtomicU64,
    /// When the block was pinned (0: not pinned).
    pinned_at: AtomicU64,
}

/// What the detector says about a fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing to change.
    Keep,
    /// Pin the block to system memory: devices map it remotely. `flips` happened within
    /// `within`.
    Pin { flips: u32, within: Duration },
    /// The pin's time is up: lift it and watch the block again.
    Unpin,
}

/// The detector: shared by every block, its state in each block's slot.
#[derive(Debug)]
pub struct Thrashing {
    config: ThrashingConfig,
    t0: Instant,
}

impl Thrashing {
    pub fn new(config: ThrashingConfig) -> Self {
        Self {
            config: ThrashingConfig {
                threshold: config.threshold.max(2),
                ..config
            },
            t0: Instant::now(),
        }
    }

    fn now(&self) -> u64 {
        (self.t0.elapsed().as_nanos() as u64).max(1)
    }

    /// Counts a move of the block's data to `to`; returns the flips in the current run.
    fn flip(&self, b: &ThrashingBlock, to: u8) -> (u32, u64) {
        let now = self.now();
        let from = b.owner.swap(to, Ordering::AcqRel);
        if from == to {
            return (b.flips.load(Ordering::Acquire), now);
        }
        let first = b.first_flip.load(Ordering::Acquire);
        if from == NOBODY || now.saturating_sub(first) > self.config.window.as_nanos() as u64 {
            // A new run of flips.
            b.first_flip.store(now, Ordering::Release);
            b.flips.store(1, Ordering::Release);
            return (1, now);
        }
        (b.flips.fetch_add(1, Ordering::AcqRel) + 1, now)
    }

    /// A CPU fault on the block; `from_device` is true when its data lives only in private
    /// device memory (the fault migrates it home).
    pub fn cpu_fault(&self, b: &ThrashingBlock, from_device: bool) {
        if from_device {
            self.flip(b, CPU);
        }
    }

    /// A fault of device `dev` on the block, whose data is in system memory and not on the
    /// device when `to_device` is true (without a pin, the fault migrates it there).
    /// `advised`: the application gave the block a preferred location of its own.
    pub fn device_fault(
        &self,
        b: &ThrashingBlock,
        dev: usize,
        to_device: bool,
        advised: bool,
    ) -> Verdict {
        let pinned_at = b.pinned_at.load(Ordering::Acquire);
        if pinned_at != 0 {
            if self.now().saturating_sub(pinned_at) > self.config.pin.as_nanos() as u64 {
                b.pinned_at.store(0, Ordering::Release);
                b.flips.store(0, Ordering::Release);
                b.owner.store(NOBODY, Ordering::Release);
                return Verdict::Unpin;
            }
            return Verdict::Keep;
        }
        if !to_device || advised {
            return Verdict::Keep;
        }
        let (flips, now) = self.flip(b, DEVICE.saturating_add(dev as u8));
        if flips >= self.config.threshold {
            let first = b.first_flip.load(Ordering::Acquire);
            b.pinned_at.store(now, Ordering::Release);
            return Verdict::Pin {
                flips,
                within: Duration::from_nanos(now.saturating_sub(first)),
            };
        }
        Verdict::Keep
    }

    /// Whether the block is pinned now.
    pub fn is_pinned(&self, b: &ThrashingBlock) -> bool {
        b.pinned_at.load(Ordering::Acquire) != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quick() -> Thrashing {
        Thrashing::new(ThrashingConfig {
            threshold: 4,
            window: Duration::from_secs(10),
            pin: Duration::from_millis(20),
        })
    }

    #[test]
    fn ping_pong_engages_within_two_round_trips() {
        let t = quick();
        let b = ThrashingBlock::default();
        let mut verdicts = Vec::new();
        for _round in 0..4 {
            // The device takes the data, then the CPU takes it back.
            verdicts.push(t.device_fault(&b, 0, true, false));
            t.cpu_fault(&b, true);
        }
        // Flips: dev (1), cpu (2), dev (3), cpu (4), dev (5): pinned at the third device
        // fault, the start of the third round trip.
        assert_eq!(verdicts[0], Verdict::Keep);
        assert_eq!(verdicts[1], Verdict::Keep);
        assert!(
            matches!(verdicts[2], Verdict::Pin { flips: 5, .. }),
            "{verdicts:?}"
        );
        assert_eq!(verdicts[3], Verdict::Keep, "pinned: nothing more to do");
        assert!(t.is_pinned(&b));
    }

    #[test]
    fn the_pin_is_lifted_after_its_time_and_the_block_watched_again() {
        let t = quick();
        let b = ThrashingBlock::default();
        for _ in 0..3 {
            t.device_fault(&b, 0, true, false);
            t.cpu_fault(&b, true);
        }
        assert!(t.is_pinned(&b));
        // Spin until the pin's time (20 ms) has passed: a deadline, not a sleep.
        let until = Instant::now() + Duration::from_millis(25);
        while Instant::now() < until {
            std::hint::spin_loop();
        }
        assert_eq!(t.device_fault(&b, 0, true, false), Verdict::Unpin);
        assert!(!t.is_pinned(&b));
        assert_eq!(t.device_fault(&b, 0, true, false), Verdict::Keep);
    }

    #[test]
    fn one_way_traffic_and_advised_blocks_are_left_alone() {
        let t = quick();
        let b = ThrashingBlock::default();
        // A device streaming through data: every fault moves data to it, none back.
        for _ in 0..100 {
            assert_eq!(t.device_fault(&b, 0, true, false), Verdict::Keep);
        }
        let advised = ThrashingBlock::default();
        for _ in 0..10 {
            assert_eq!(t.device_fault(&advised, 0, true, true), Verdict::Keep);
            t.cpu_fault(&advised, true);
        }
        assert!(!t.is_pinned(&advised));
    }

    #[test]
    fn flips_far_apart_do_not_add_up() {
        let t = Thrashing::new(ThrashingConfig {
            threshold: 4,
            window: Duration::from_millis(1),
            pin: Duration::from_millis(20),
        });
        let b = ThrashingBlock::default();
        for _ in 0..5 {
            assert_eq!(t.device_fault(&b, 0, true, false), Verdict::Keep);
            t.cpu_fault(&b, true);
            let until = Instant::now() + Duration::from_millis(3);
            while Instant::now() < until {
                std::hint::spin_loop();
            }
        }
        assert!(!t.is_pinned(&b));
    }
}
