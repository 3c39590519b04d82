//! Formatting: byte sizes, counts, the benchmark table and its JSON form.

use serde::{Deserialize, Serialize};

/// `1.5 GiB`, `64 MiB`, `12 KiB`, `100 B`.
pub fn fmt_bytes(b: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 || v.fract() == 0.0 {
        format!("{v:.0} {}", UNITS[u])
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// `1234567` as `1,234,567`.
pub fn fmt_count(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

/// What a ratio must satisfy.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", content = "value", rename_all = "snake_case")]
pub enum Target {
    /// Higher is better: ratio >= value.
    AtLeast(f64),
    /// Lower is better: ratio <= value.
    AtMost(f64),
    /// Lower is better, as a difference: hetmem - baseline <= value, in the row's unit (a
    /// launch's overhead: "at most 10 us more").
    AtMostAbove(f64),
    /// Reported only.
    None,
}

impl Target {
    pub fn check(self, ratio: Option<f64>) -> Option<bool> {
        match (self, ratio) {
            (Target::AtLeast(t), Some(r)) => Some(r >= t),
            (Target::AtMost(t), Some(r)) => Some(r <= t),
            _ => None,
        }
    }

    /// [`Target::check`], and for a difference target the difference of the medians.
    pub fn check_values(self, hetmem: f64, baseline: Option<f64>) -> Option<bool> {
        match (self, baseline) {
            (Target::AtMostAbove(t), Some(b)) => Some(hetmem - b <= t),
            (_, b) => self.check(b.map(|b| hetmem / b)),
        }
    }

    /// Whether lower values are better.
    pub fn lower_is_better(self) -> bool {
        matches!(self, Target::AtMost(_) | Target::AtMostAbove(_))
    }

    fn show(self, unit: &str) -> String {
        match self {
            Target::AtLeast(t) => format!(">= {t}"),
            Target::AtMost(t) => format!("<= {t}"),
            Target::AtMostAbove(t) => format!("<= +{t} {unit}"),
            Target::None => "-".into(),
        }
    }
}

/// Runtime counters (`Hetmem::stats`) over the timed part of one hetmem run
/// (`StatsSnapshot::since`).
pub type Counters = hetmem::StatsSnapshot;

/// One line of counters for the table.
trait Show {
    fn show(&self) -> String;
}

impl Show for Counters {
    fn show(&self) -> String {
        let file = if self.pages_from_file + self.pages_written_back > 0 {
            format!(
                ", {} pages from file, {} written back",
                fmt_count(self.pages_from_file),
                fmt_count(self.pages_written_back)
            )
        } else {
            String::new()
        };
        format!(
            "{} CPU faults, {} device faults, {} pages to device, {} to system, {} read ahead, {} zero-filled, {} copied{}",
            fmt_count(self.cpu_faults),
            fmt_count(self.device_faults),
            fmt_count(self.pages_to_device),
            fmt_count(self.pages_to_system),
            fmt_count(self.pages_prefetched),
            fmt_count(self.zero_fills),
            fmt_bytes(self.bytes_copied),
            file
        )
    }
}

/// One row of the benchmark table.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// Short id (`a`, `b`, `d-to-device`, `e-p50`, ...).
    pub id: String,
    /// What was measured.
    pub name: String,
    /// Unit of `hetmem` and `baseline`.
    pub unit: String,
    /// Median of the hetmem samples.
    pub hetmem: f64,
    /// Median of the baseline samples (absent when there is no baseline).
    pub baseline: Option<f64>,
    /// hetmem / baseline.
    pub ratio: Option<f64>,
    pub target: Target,
    /// Whether the ratio meets the target (absent for reported-only rows).
    pub pass: Option<bool>,
    /// What the baseline is.
    pub baseline_name: String,
    /// Per-run hetmem values (after the warm-up run).
    pub hetmem_samples: Vec<f64>,
    /// Per-run baseline values.
    pub baseline_samples: Vec<f64>,
    /// hetmem's counters during the last measured run, where they say something.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub counters: Option<Counters>,
    /// What the baseline is, as a kind, for the plot: `pinned` (a pinned copy: the PCIe
    /// limit), `managed` (CUDA managed memory), or another word.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub against: Option<String>,
    /// Why the row has no figures: not built, or not run (then `hetmem` is 0 and the samples
    /// are empty).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub not_built: Option<String>,
}

impl Row {
    /// A row with no figures, and why.
    pub fn not_built(id: &str, name: &str, target: Target, why: &str) -> Row {
        Row {
            id: id.into(),
            name: name.into(),
            unit: String::new(),
            hetmem: 0.0,
            baseline: None,
            ratio: None,
            target,
            pass: None,
            baseline_name: String::new(),
            hetmem_samples: Vec::new(),
            baseline_samples: Vec::new(),
            counters: None,
            against: None,
            not_built: Some(why.into()),
        }
    }
}

/// The whole benchmark report.
#[derive(Debug, Serialize)]
pub struct BenchReport {
    pub tool: &'static str,
    pub kernel: String,
    pub cpus: usize,
    pub size_mib: usize,
    pub runs: usize,
    pub uffd_features: Vec<String>,
    pub rows: Vec<Row>,
    pub all_pass: bool,
}

fn fmt_val(v: f64, unit: &str) -> String {
    let num = if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    };
    format!("{num} {unit}")
}

/// The table, as printed.
pub fn table(rows: &[Row]) -> String {
    let header = [
        "measurement",
        "hetmem",
        "baseline",
        "ratio",
        "target",
        "result",
    ];
    let cells: Vec<[String; 6]> = rows
        .iter()
        .map(|r| {
            if r.not_built.is_some() {
                return [
                    format!("{} {}", r.id, r.name),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    r.target.show(&r.unit),
                    match &r.not_built {
                        Some(why) if why.starts_with("not run") => "not run".into(),
                        _ => "not built".into(),
                    },
                ];
            }
            [
                format!("{} {}", r.id, r.name),
                fmt_val(r.hetmem, &r.unit),
                r.baseline
                    .map_or_else(|| "-".into(), |b| fmt_val(b, &r.unit)),
                r.ratio.map_or_else(|| "-".into(), |x| format!("{x:.2}")),
                r.target.show(&r.unit),
                match r.pass {
                    Some(true) => "pass".into(),
                    Some(false) => "FAIL".into(),
                    None => "info".into(),
                },
            ]
        })
        .collect();
    let mut w = header.map(str::len);
    for c in &cells {
        for (i, s) in c.iter().enumerate() {
            w[i] = w[i].max(s.chars().count());
        }
    }
    let mut out = String::new();
    let line = |out: &mut String, c: &[String]| {
        for (i, s) in c.iter().enumerate() {
            let pad = w[i] - s.chars().count();
            if i == 0 {
                out.push_str(s);
                out.push_str(&" ".repeat(pad));
            } else {
                out.push_str("  ");
                out.push_str(&" ".repeat(pad));
                out.push_str(s);
            }
        }
        out.push('\n');
    };
    line(&mut out, &header.map(String::from));
    let total: usize = w.iter().sum::<usize>() + 2 * (w.len() - 1);
    out.push_str(&"-".repeat(total));
    out.push('\n');
    for c in &cells {
        line(&mut out, c);
    }
    let notes: Vec<String> = rows
        .iter()
        .filter_map(|r| r.counters.map(|c| format!("  {:<3} {}\n", r.id, c.show())))
        .collect();
    if !notes.is_empty() {
        out.push_str("\nhetmem counters during the last timed run:\n");
        notes.iter().for_each(|n| out.push_str(n));
    }
    let missing: Vec<String> = rows
        .iter()
        .filter_map(|r| {
            r.not_built
                .as_ref()
                .map(|why| format!("  {:<3} {why}\n", r.id))
        })
        .collect();
    if !missing.is_empty() {
        out.push_str("\nrows without figures:\n");
        missing.iter().for_each(|n| out.push_str(n));
    }
    out
}

/// Median of a non-empty sample (mean of the middle two for even lengths).
pub fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Nearest-rank percentile (`p` in 0..=100) of a non-empty sample.
pub fn percentile(xs: &mut [u64], p: f64) -> u64 {
    if xs.is_empty() {
        return 0;
    }
    xs.sort_unstable();
    let rank = ((p / 100.0) * xs.len() as f64).ceil() as usize;
    xs[rank.clamp(1, xs.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        assert_eq!(fmt_bytes(64 << 20), "64 MiB");
        assert_eq!(fmt_bytes(1536), "1.5 KiB");
        assert_eq!(fmt_count(1_234_567), "1,234,567");
        assert_eq!(fmt_count(12), "12");
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        let mut v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&mut v, 50.0), 50);
        assert_eq!(percentile(&mut v, 99.0), 99);
    }
}
