//! Decision cost of the protocol engine against copying the data it decides about.
//!
//! Measures, on one 2 MiB block with three devices: a one-page CPU fault (fault, zero-fill
//! completion, map), a 2 MiB migration to a device (request, completion, collapse), and a
//! 512-page eviction (request, copy-back completion, free), each against a 2 MiB `memcpy` between
//! pre-faulted buffers measured in the same run. Medians of repeated runs. Prints a table, and
//! JSON on the last line (also written to `target/hetmem-bench/decide.json`).
//!
//! `cargo bench -p hetmem-proto --bench decide`

use hetmem_proto::{
    Access, Action, Block2M, DeviceId, DeviceKind, Env, Event, FrameCounts, Layout, Mem, PageRun,
    Proc, ReqId, RequestKind, Topology, PAGES_PER_BLOCK, PAGE_SIZE,
};
use std::hint::black_box;
use std::time::Instant;

const RUNS: usize = 21;
const BLOCK_BYTES: usize = PAGES_PER_BLOCK * PAGE_SIZE;

fn topology() -> Topology {
    let mut t = Topology::new(vec![
        DeviceKind::Private,
        DeviceKind::Coherent,
        DeviceKind::Private,
    ])
    .expect("3 devices");
    t.policy.cpu_fault_around = 1;
    t
}

fn dev0() -> DeviceId {
    DeviceId::new(0).expect("device 0")
}

struct Bench {
    topo: Topology,
    frames: FrameCounts,
    out: Vec<Action>,
}

impl Bench {
    fn handle(&mut self, block: &mut Block2M, event: Event) {
        self.out.clear();
        let mut env = Env {
            topology: &self.topo,
            frames: &mut self.frames,
        };
        block
            .handle(&mut env, event, &mut self.out)
            .expect("valid event");
    }

    /// Handles `event`, then completes every op it started, successfully.
    fn settle(&mut self, block: &mut Block2M, event: Event) {
        self.handle(block, event);
        loop {
            let Some(op) = block.ops_in_flight().next() else {
                break;
            };
            self.handle(block, Event::Complete { op, result: Ok(()) });
        }
    }

    fn request(&mut self, block: &mut Block2M, run: PageRun, kind: RequestKind) {
        self.settle(
            block,
            Event::Request {
                id: ReqId(0),
                pages: run,
                kind,
            },
        );
    }
}

fn whole() -> PageRun {
    PageRun::new(0, PAGES_PER_BLOCK, PAGES_PER_BLOCK).expect("block run")
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Median seconds of `f` over `RUNS` runs, each after an untimed `setup`.
fn time<S>(mut setup: impl FnMut() -> S, mut f: impl FnMut(S)) -> f64 {
    // Warm-up run, untimed.
    f(setup());
    median(
        (0..RUNS)
            .map(|_| {
                let s = setup();
                let t = Instant::now();
                f(s);
                t.elapsed().as_secs_f64()
            })
            .collect(),
    )
}

fn main() {
    let mut b = Bench {
        topo: topology(),
        frames: FrameCounts::new(&[u32::MAX / 2; 3]),
        out: Vec::with_capacity(4096),
    };

    // Baseline: 2 MiB memcpy between pre-faulted buffers.
    let src = vec![0x5au8; BLOCK_BYTES];
    let mut dst = vec![0u8; BLOCK_BYTES];
    dst.copy_from_slice(&src);
    let memcpy = time(
        || (),
        |()| {
            for _ in 0..16 {
                dst.copy_from_slice(black_box(&src));
                black_box(&mut dst);
            }
        },
    ) / 16.0;

    let empty = Block2M::new(Layout::anonymous());
    let mut in_system = empty.clone();
    b.request(
        &mut in_system,
        whole(),
        RequestKind::Migrate { dst: Mem::System },
    );
    let mut on_device = in_system.clone();
    b.request(
        &mut on_device,
        whole(),
        RequestKind::Migrate {
            dst: Mem::Device(dev0()),
        },
    );

    // (1) 512 one-page CPU faults on fresh anonymous memory: fault, zero-fill completion, map.
    let faults = {
        let b = &mut b;
        let empty = &empty;
        time(
            || empty.clone(),
            |mut blk| {
                for p in 0..PAGES_PER_BLOCK {
                    let run = PageRun::page(p, PAGES_PER_BLOCK).expect("page");
                    let kind = RequestKind::Fault {
                        proc: Proc::Cpu,
                        access: Access::Write,
                    };
                    b.request(&mut blk, run, kind);
                }
                black_box(blk);
            },
        ) / PAGES_PER_BLOCK as f64
    };
    let reset = |b: &mut Bench| b.frames = FrameCounts::new(&[u32::MAX / 2; 3]);

    // (2) 2 MiB migration system -> device 0: request, completion, collapse.
    let migrate = time(
        || in_system.clone(),
        |mut blk| {
            b.request(
                &mut blk,
                whole(),
                RequestKind::Migrate {
                    dst: Mem::Device(dev0()),
                },
            );
            black_box(blk);
        },
    );
    reset(&mut b);

    // (3) 512-page eviction from device 0: request, copy-back completion, free.
    let evict = time(
        || on_device.clone(),
        |mut blk| {
            let kind = RequestKind::Evict {
                dev: dev0(),
                pages: PAGES_PER_BLOCK as u32,
                write_back: false,
            };
            b.request(&mut blk, whole(), kind);
            black_box(blk);
        },
    );

    let (meta_block, meta_page) = hetmem_proto::BlockState::<8>::metadata_bytes();
    let rows = [
        (
            "cpu_fault_1_page",
            faults,
            faults / (memcpy / PAGES_PER_BLOCK as f64),
            "4 KiB memcpy",
        ),
        ("migrate_2mib", migrate, migrate / memcpy, "2 MiB memcpy"),
        ("evict_512_pages", evict, evict / memcpy, "2 MiB memcpy"),
    ];
    println!(
        "{:<20} {:>12} {:>14} {:>10}  target",
        "decision", "median", "baseline", "ratio"
    );
    println!("{:<20} {:>10.1}us {:>14}", "memcpy_2mib", memcpy * 1e6, "-");
    for (name, secs, ratio, base) in rows {
        let target = if name == "cpu_fault_1_page" {
            "reported"
        } else {
            "< 2%"
        };
        println!(
            "{name:<20} {:>10.2}us {base:>14} {:>9.2}%  {target}",
            secs * 1e6,
            ratio * 100.0
        );
    }
    println!("metadata: {meta_block} bytes per 2 MiB block, {meta_page:.2} bytes per 4 KiB page (budget 16)");
    let json = format!(
        "{{\"bench\":\"decide\",\"runs\":{RUNS},\"memcpy_2mib_s\":{memcpy:e},\
         \"cpu_fault_1_page_s\":{faults:e},\"cpu_fault_vs_4k_memcpy\":{:.5},\
         \"migrate_2mib_s\":{migrate:e},\"migrate_vs_memcpy\":{:.5},\
         \"evict_512_s\":{evict:e},\"evict_vs_memcpy\":{:.5},\
         \"metadata_bytes_per_block\":{meta_block},\"metadata_bytes_per_page\":{meta_page:.3}}}",
        rows[0].2, rows[1].2, rows[2].2
    );
    println!("{json}");
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/hetmem-bench");
    if std::fs::create_dir_all(&dir).is_ok() {
        let _ = std::fs::write(dir.join("decide.json"), format!("{json}\n"));
    }
}
