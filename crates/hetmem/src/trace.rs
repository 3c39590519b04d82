//! The trace: faults, migrations, fills, evictions, invalidations, policy decisions, launches
//! and lease breaks, written as Chrome trace events (the JSON object format), which Perfetto
//! (ui.perfetto.dev) and `chrome://tracing` open, and `hetmem trace FILE --html OUT` renders.
//!
//! Turned on by `HetmemBuilder::trace(path)` or `HETMEM_TRACE=path`. Off, each place that
//! records costs one branch on an `Option` (`Runtime::trace`). On, an event is formatted into
//! a buffered writer under a mutex: a few hundred nanoseconds (`hetmem bench --trace`).
//!
//! Every event has `ts` (microseconds since the context was built), `pid`, `tid` (the thread
//! that did the work), a `cat` (`fault`, `migrate`, `fill`, `evict`, `invalidate`, `policy`,
//! `launch`, `lease`, `writeback`) and `args`; work with a duration is a complete event
//! (`"ph":"X"`, `dur`), the rest instant events (`"ph":"i"`). Where the work belongs to one
//! 2 MiB block, `args` name it: `region` (the region's id) and `block` (its index), with the
//! memory in `from`/`to` (`system`, `dev0`, ...).

use std::collections::HashSet;
use std::fmt::Write as _;
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::Path;
use std::sync::Mutex;
use std::time::Instant;

/// A value in an event's `args`.
#[derive(Clone, Debug)]
pub(crate) enum Arg<'a> {
    U(u64),
    S(&'a str),
}

impl From<u64> for Arg<'_> {
    fn from(v: u64) -> Self {
        Arg::U(v)
    }
}

impl From<usize> for Arg<'_> {
    fn from(v: usize) -> Self {
        Arg::U(v as u64)
    }
}

impl<'a> From<&'a str> for Arg<'a> {
    fn from(v: &'a str) -> Self {
        Arg::S(v)
    }
}

/// Writes the trace file.
#[derive(Debug)]
pub(crate) struct Tracer {
    inner: Mutex<Inner>,
    t0: Instant,
    pid: u32,
}

#[derive(Debug)]
struct Inner {
    out: BufWriter<File>,
    /// Threads named in the file so far (a metadata event each).
    named: HashSet<u32>,
    line: String,
    /// The first write error; later events are dropped.
    failed: bool,
}

impl Tracer {
    /// Creates (or truncates) `path` and writes the header.
    pub fn create(path: &Path) -> io::Result<Self> {
        let mut out = BufWriter::with_capacity(1 << 16, File::create(path)?);
        out.write_all(b"{\"displayTimeUnit\":\"ns\",\"traceEvents\":[\n")?;
        let pid = std::process::id();
        let mut line = String::new();
        let _ = write!(
            line,
            "{{\"ph\":\"M\",\"name\":\"process_name\",\"pid\":{pid},\"tid\":0,\"args\":{{\"name\":\"hetmem\"}}}}"
        );
        out.write_all(line.as_bytes())?;
        Ok(Self {
            inner: Mutex::new(Inner {
                out,
                named: HashSet::new(),
                line: String::new(),
                failed: false,
            }),
            t0: Instant::now(),
            pid,
        })
    }

    /// Nanoseconds since the context was built.
    fn ns(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.t0).as_nanos() as u64
    }

    /// Work that ran from `start` to `end`.
    pub fn complete(
        &self,
        cat: &str,
        name: &str,
        start: Instant,
        end: Instant,
        args: &[(&str, Arg<'_>)],
    ) {
        let dur = end.saturating_duration_since(start).as_nanos() as u64;
        self.write(cat, name, "X", self.ns(start), Some(dur), args);
    }

    /// Something that happened now.
    pub fn instant(&self, cat: &str, name: &str, args: &[(&str, Arg<'_>)]) {
        self.write(cat, name, "i", self.ns(Instant::now()), None, args);
    }

    fn write(
        &self,
        cat: &str,
        name: &str,
        ph: &str,
        ts: u64,
        dur: Option<u64>,
        args: &[(&str, Arg<'_>)],
    ) {
        let tid = rustix::thread::gettid().as_raw_nonzero().get() as u32;
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if g.failed {
            return;
        }
        let Inner {
            out, named, line, ..
        } = &mut *g;
        line.clear();
        if named.insert(tid) {
            let comm =
                std::fs::read_to_string(format!("/proc/self/task/{tid}/comm")).unwrap_or_default();
            let _ = write!(
                line,
                ",\n{{\"ph\":\"M\",\"name\":\"thread_name\",\"pid\":{},\"tid\":{tid},\"args\":{{\"name\":",
                self.pid
            );
            json_str(line, comm.trim());
            line.push_str("}}");
        }
        line.push_str(",\n{\"ph\":\"");
        line.push_str(ph);
        line.push_str("\",\"cat\":");
        json_str(line, cat);
        line.push_str(",\"name\":");
        json_str(line, name);
        // Microseconds with three decimals, formatted as integers (float formatting costs
        // more than the rest of an event).
        let _ = write!(line, ",\"ts\":{}.{:03}", ts / 1000, ts % 1000);
        if let Some(d) = dur {
            let _ = write!(line, ",\"dur\":{}.{:03}", d / 1000, d % 1000);
        } else {
            line.push_str(",\"s\":\"t\"");
        }
        let _ = write!(line, ",\"pid\":{},\"tid\":{tid},\"args\":{{", self.pid);
        for (i, (k, v)) in args.iter().enumerate() {
            if i > 0 {
                line.push(',');
            }
            json_str(line, k);
            line.push(':');
            match v {
                Arg::U(n) => {
                    let _ = write!(line, "{n}");
                }
                Arg::S(s) => json_str(line, s),
            }
        }
        line.push_str("}}");
        if out.write_all(line.as_bytes()).is_err() {
            g.failed = true;
        }
    }

    /// Writes what is buffered (the file stays a valid trace only once dropped).
    pub fn flush(&self) {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let _ = g.out.flush();
    }
}

impl Drop for Tracer {
    fn drop(&mut self) {
        let g = self.inner.get_mut().unwrap_or_else(|e| e.into_inner());
        let _ = g.out.write_all(b"\n]}\n");
        let _ = g.out.flush();
    }
}

/// Appends `s` as a JSON string.
fn json_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// A memory's name in the trace: `system`, `dev0`, `dev1`, ...
pub(crate) fn mem_name(m: hetmem_proto::Mem) -> &'static str {
    const DEVS: [&str; 8] = [
        "dev0", "dev1", "dev2", "dev3", "dev4", "dev5", "dev6", "dev7",
    ];
    match m {
        hetmem_proto::Mem::System => "system",
        hetmem_proto::Mem::Device(d) => DEVS.get(d.index()).copied().unwrap_or("dev?"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_file_is_json_with_the_events_written() {
        let dir = std::env::temp_dir().join(format!("hetmem-trace-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.json");
        {
            let t = Tracer::create(&path).unwrap();
            let s = Instant::now();
            t.complete(
                "migrate",
                "migrate",
                s,
                Instant::now(),
                &[("to", Arg::S("dev0")), ("pages", Arg::U(512))],
            );
            t.instant("policy", "read \"ahead\"", &[("blocks", Arg::U(4))]);
        }
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(text.starts_with("{\"displayTimeUnit\""));
        assert!(text.trim_end().ends_with("]}"));
        assert!(text.contains("\"ph\":\"X\",\"cat\":\"migrate\""));
        assert!(text.contains("\"pages\":512"));
        assert!(text.contains("read \\\"ahead\\\""));
        assert!(text.contains("\"thread_name\""));
        // Balanced braces and brackets: a cheap well-formedness check (no JSON parser here).
        let opens = text.matches('{').count();
        let closes = text.matches('}').count();
        assert_eq!(opens, closes);
    }
}
