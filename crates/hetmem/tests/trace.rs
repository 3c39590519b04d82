//! The trace (`HetmemBuilder::trace`): a run that faults, migrates, fills, evicts, invalidates,
//! reads back with the policy's window and read-ahead, and launches kernels writes a Chrome
//! trace file with each kind of event, each naming its block where it has one.

mod common;

use std::collections::BTreeSet;

use anyhow::{ensure, Context, Result};
use hetmem::{DeviceKind, Hetmem, Target, PAGE_SIZE};
use serde_json::Value;

const MIB: usize = 1 << 20;

#[test]
fn a_run_writes_every_kind_of_event() -> Result<()> {
    common::watchdog("a_run_writes_every_kind_of_event", 60, || {
        let dir = std::env::temp_dir().join(format!("hetmem-trace-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let path = dir.join("run.json");
        {
            // Room for 4 of the buffer's 8 blocks: migrating all of it evicts.
            let hm = Hetmem::builder()
                .sim_device(DeviceKind::Private, 8 * MIB)
                .trace(&path)
                .build()?;
            let dev = hm.device(0).context("device")?;
            let mut buf = hm.alloc(16 * MIB)?;
            buf.fill(7); // CPU first touches: faults and zero fills
            hm.migrate(buf.addr(), 8 * MIB, Target::Device(dev.id()))?;
            dev.kernel_write(buf.addr() + 8 * MIB, 8 * MIB, |_, b| b.fill(9))?; // evicts
            let sum: u64 = buf.iter().map(|&b| u64::from(b)).sum(); // read-back, read-ahead
            ensure!(
                sum == 8 * MIB as u64 * 7 + 8 * MIB as u64 * 9,
                "data: sum {sum}"
            );
            hm.discard(buf.addr(), PAGE_SIZE)?;
            ensure!(hm.stats().errors == 0, "errors");
        }
        let text = std::fs::read_to_string(&path)?;
        std::fs::remove_dir_all(&dir)?;
        let trace: Value = serde_json::from_str(&text).context("the trace is not JSON")?;
        let events = trace["traceEvents"].as_array().context("no traceEvents")?;
        let cats: BTreeSet<&str> = events.iter().filter_map(|e| e["cat"].as_str()).collect();
        for want in [
            "fault",
            "fill",
            "migrate",
            "evict",
            "invalidate",
            "policy",
            "launch",
        ] {
            ensure!(
                cats.contains(want),
                "no {want:?} event; the trace has {cats:?}"
            );
        }
        for e in events.iter().filter(|e| e["cat"] == "migrate") {
            ensure!(
                e["ph"] == "X" && e["dur"].is_number(),
                "a migration without a duration: {e}"
            );
            ensure!(
                e["args"]["block"].is_u64() && e["args"]["region"].is_u64(),
                "{e}"
            );
            ensure!(
                e["args"]["to"].is_string() && e["args"]["from"].is_string(),
                "{e}"
            );
        }
        ensure!(
            events
                .iter()
                .any(|e| e["cat"] == "policy" && e["args"]["reason"].is_string()),
            "no policy decision with its reason"
        );
        ensure!(
            events
                .iter()
                .any(|e| e["name"] == "thread_name" && e["ph"] == "M"),
            "threads are not named"
        );
        Ok(())
    })
}

#[test]
fn hetmem_trace_turns_it_on_without_the_builder() -> Result<()> {
    common::watchdog("hetmem_trace_turns_it_on_without_the_builder", 60, || {
        let dir = std::env::temp_dir().join(format!("hetmem-envtrace-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let path = dir.join("env.json");
        // The other test here names its file with `trace(path)`, which the variable does not
        // override, so setting it races with nothing that reads it.
        std::env::set_var("HETMEM_TRACE", &path);
        let built = Hetmem::builder().build();
        std::env::remove_var("HETMEM_TRACE");
        {
            let hm = built?;
            let mut buf = hm.alloc(2 * MIB)?;
            buf.fill(1);
        }
        let text = std::fs::read_to_string(&path).context("no trace file")?;
        std::fs::remove_dir_all(&dir)?;
        let trace: Value = serde_json::from_str(&text)?;
        let faults = trace["traceEvents"]
            .as_array()
            .context("no traceEvents")?
            .iter()
            .filter(|e| e["name"] == "cpu fault")
            .count();
        ensure!(faults >= 1, "no CPU fault traced");
        Ok(())
    })
}
