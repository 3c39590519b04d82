//! `hetmem trace FILE --html OUT`: renders a trace (`HetmemBuilder::trace`, Chrome trace event
//! JSON) as one self-contained HTML page (inline SVG, no script, nothing fetched): where each
//! 2 MiB block's data was over time, migration traffic per direction, faults per processor,
//! and the policy decisions marked on the timeline.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use serde_json::Value;

#[derive(Debug, Args)]
pub struct TraceArgs {
    /// The trace file (`HetmemBuilder::trace`, `HETMEM_TRACE`, `hetmem demo --trace`).
    pub file: PathBuf,
    /// Write the page here.
    #[arg(long)]
    pub html: PathBuf,
}

pub fn run(a: &TraceArgs) -> Result<()> {
    let text =
        std::fs::read_to_string(&a.file).with_context(|| format!("read {}", a.file.display()))?;
    let trace = Trace::parse(&text)?;
    let page = trace.html(&a.file);
    std::fs::write(&a.html, page).with_context(|| format!("write {}", a.html.display()))?;
    eprintln!(
        "{} events, {} blocks, {:.1} ms: {}",
        trace.events.len(),
        trace.blocks.len(),
        trace.end / 1e3,
        a.html.display()
    );
    Ok(())
}

/// One event of the file, as the page uses it.
#[derive(Clone, Debug)]
struct Ev {
    cat: String,
    name: String,
    /// Start and end, in microseconds.
    ts: f64,
    end: f64,
    block: Option<(u64, u64)>,
    args: Value,
}

impl Ev {
    fn arg(&self, k: &str) -> &str {
        self.args[k].as_str().unwrap_or("")
    }

    fn num(&self, k: &str) -> f64 {
        self.args[k].as_f64().unwrap_or(0.0)
    }
}

/// A parsed trace.
#[derive(Debug)]
pub struct Trace {
    events: Vec<Ev>,
    /// Every (region, block) named, in order.
    blocks: Vec<(u64, u64)>,
    /// The last event's end, in microseconds.
    end: f64,
}

/// A stretch of time a block's data spent in one place: start, end (microseconds), where.
type Segment = (f64, f64, String);

/// Where a block's data is, as the residency timeline colours it.
const LOCATIONS: [(&str, &str); 6] = [
    ("system", "#4e79a7"),
    ("dev0", "#f28e2b"),
    ("dev1", "#59a14f"),
    ("dev2", "#b07aa1"),
    ("dev3", "#edc948"),
    ("none", "#d9d9d9"),
];

/// Traffic directions and their colours.
const DIRECTIONS: [(&str, &str); 5] = [
    ("to device", "#f28e2b"),
    ("to system", "#4e79a7"),
    ("device to device", "#59a14f"),
    ("file read", "#76b7b2"),
    ("writeback", "#e15759"),
];

fn color_of(loc: &str) -> &'static str {
    LOCATIONS
        .iter()
        .find(|(l, _)| *l == loc)
        .map_or("#9c755f", |(_, c)| c)
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

impl Trace {
    /// Parses a trace file. A file whose writer was killed before it closed it lacks the
    /// closing brackets: they are added.
    pub fn parse(text: &str) -> Result<Trace> {
        let v: Value = match serde_json::from_str(text) {
            Ok(v) => v,
            Err(_) => serde_json::from_str(&format!("{}\n]}}", text.trim_end()))
                .context("not a trace file (Chrome trace event JSON)")?,
        };
        let raw = v["traceEvents"]
            .as_array()
            .context("no traceEvents in the file")?;
        let mut events = Vec::new();
        let mut blocks = BTreeSet::new();
        let mut end: f64 = 0.0;
        for e in raw {
            let ph = e["ph"].as_str().unwrap_or("");
            if ph != "X" && ph != "i" {
                continue;
            }
            let ts = e["ts"].as_f64().unwrap_or(0.0);
            let dur = e["dur"].as_f64().unwrap_or(0.0);
            let args = e["args"].clone();
            let block = match (args["region"].as_u64(), args["block"].as_u64()) {
                (Some(r), Some(b)) if r > 0 => Some((r, b)),
                _ => None,
            };
            if let Some(b) = block {
                blocks.insert(b);
            }
            end = end.max(ts + dur);
            events.push(Ev {
                cat: e["cat"].as_str().unwrap_or("").to_string(),
                name: e["name"].as_str().unwrap_or("").to_string(),
                ts,
                end: ts + dur,
                block,
                args,
            });
        }
        events.sort_by(|a, b| a.ts.total_cmp(&b.ts));
        Ok(Trace {
            events,
            blocks: blocks.into_iter().collect(),
            end: end.max(1.0),
        })
    }

    /// Residency segments per block: (start, end, location).
    fn residency(&self) -> BTreeMap<(u64, u64), Vec<Segment>> {
        let mut changes: BTreeMap<(u64, u64), Vec<(f64, String)>> = BTreeMap::new();
        for e in &self.events {
            let Some(b) = e.block else { continue };
            let to = match (e.cat.as_str(), e.name.as_str()) {
                ("migrate" | "fill", _) if e.arg("result") == "ok" => e.arg("to").to_string(),
                ("invalidate", "discard" | "unmap" | "truncate") => "none".to_string(),
                _ => continue,
            };
            changes.entry(b).or_default().push((e.end, to));
        }
        let mut out = BTreeMap::new();
        for (b, mut ch) in changes {
            ch.sort_by(|x, y| x.0.total_cmp(&y.0));
            let mut segs = Vec::new();
            for (i, (t, loc)) in ch.iter().enumerate() {
                let next = ch.get(i + 1).map_or(self.end, |n| n.0);
                if next > *t {
                    segs.push((*t, next, loc.clone()));
                }
            }
            out.insert(b, segs);
        }
        out
    }

    fn direction(e: &Ev) -> Option<&'static str> {
        match (e.cat.as_str(), e.arg("from"), e.arg("to")) {
            ("writeback", _, _) => Some("writeback"),
            ("fill", "file", _) => Some("file read"),
            ("migrate", f, t) if f.starts_with("dev") && t.starts_with("dev") => {
                Some("device to device")
            }
            ("migrate", _, t) if t.starts_with("dev") => Some("to device"),
            ("migrate", _, "system") => Some("to system"),
            _ => None,
        }
    }

    /// Renders the page.
    pub fn html(&self, source: &Path) -> String {
        const W: f64 = 1100.0;
        const LEFT: f64 = 90.0;
        let plot = W - LEFT - 50.0;
        let x = |t: f64| LEFT + t / self.end * plot;
        let mut page = String::new();
        let _ = write!(
            page,
            "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
             <title>hetmem trace: {}</title>\n<style>\
             body{{font:14px system-ui,sans-serif;margin:24px;color:#222}}\
             h1{{font-size:20px}} h2{{font-size:16px;margin-top:28px}}\
             table{{border-collapse:collapse}} td,th{{padding:2px 10px;border-bottom:1px solid #ddd;text-align:left}}\
             .legend span{{display:inline-block;margin-right:14px}}\
             .sw{{display:inline-block;width:12px;height:12px;margin-right:4px;vertical-align:middle}}\
             svg text{{font-size:11px;fill:#444}}</style></head><body>\n",
            esc(&source.display().to_string())
        );
        let _ = writeln!(
            page,
            "<h1>hetmem trace</h1><p>{} &middot; {} events &middot; {} blocks &middot; {:.2} ms</p>",
            esc(&source.display().to_string()),
            self.events.len(),
            self.blocks.len(),
            self.end / 1e3
        );
        // Summary.
        let mut counts: BTreeMap<(String, String), (u64, f64)> = BTreeMap::new();
        for e in &self.events {
            let c = counts.entry((e.cat.clone(), e.name.clone())).or_default();
            c.0 += 1;
            c.1 += e.num("bytes");
        }
        page.push_str("<h2 id=\"summary\">Events</h2><table class=\"summary\"><tr><th>category</th><th>event</th><th>count</th><th>MiB</th></tr>\n");
        for ((cat, name), (n, bytes)) in &counts {
            let _ = writeln!(
                page,
                "<tr><td>{}</td><td>{}</td><td>{n}</td><td>{:.1}</td></tr>",
                esc(cat),
                esc(name),
                bytes / (1 << 20) as f64
            );
        }
        page.push_str("</table>\n");

        // Residency timeline with the policy decisions and launches on it.
        let rows = self.blocks.len().max(1);
        let row_h = (600.0 / rows as f64).clamp(1.0, 14.0);
        // A lane for kernel launches above the blocks.
        let top = 40.0;
        let h = top + rows as f64 * row_h + 40.0;
        page.push_str("<h2 id=\"residency\">Residency: where each 2 MiB block's data is</h2>\n<div class=\"legend\">");
        for (loc, c) in LOCATIONS {
            let _ = write!(
                page,
                "<span><i class=\"sw\" style=\"background:{c}\"></i>{loc}</span>"
            );
        }
        page.push_str("<span><i class=\"sw\" style=\"background:#000\"></i>policy decision</span><span><i class=\"sw\" style=\"background:#e15759\"></i>kernel launch</span></div>\n");
        let _ = writeln!(
            page,
            "<svg class=\"residency\" width=\"{W}\" height=\"{h:.0}\" role=\"img\" aria-label=\"residency timeline\">"
        );
        let _ = writeln!(
            page,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">launches</text>",
            LEFT - 6.0,
            top - 16.0
        );
        for e in self.events.iter().filter(|e| e.cat == "launch") {
            let _ = writeln!(
                page,
                "<rect class=\"launch\" x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"14\" fill=\"#e15759\"><title>{} on {} ({:.1} us)</title></rect>",
                x(e.ts),
                top - 28.0,
                (x(e.end) - x(e.ts)).max(1.0),
                esc(&e.name),
                esc(e.arg("dev")),
                e.end - e.ts
            );
        }
        let row_of: BTreeMap<(u64, u64), usize> = self
            .blocks
            .iter()
            .enumerate()
            .map(|(i, b)| (*b, i))
            .collect();
        for (b, segs) in self.residency() {
            let y = top + row_of[&b] as f64 * row_h;
            for (s, e, loc) in segs {
                let _ = writeln!(
                    page,
                    "<rect class=\"seg\" x=\"{:.1}\" y=\"{y:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{}\"><title>region {} block {}: {} from {:.1} us</title></rect>",
                    x(s),
                    (x(e) - x(s)).max(0.5),
                    (row_h - 0.5).max(0.5),
                    color_of(&loc),
                    b.0,
                    b.1,
                    esc(&loc),
                    s
                );
            }
        }
        for e in self
            .events
            .iter()
            .filter(|e| e.cat == "policy" || e.cat == "evict")
        {
            let Some(b) = e.block else { continue };
            let (cx, cy) = (x(e.ts), top + row_of[&b] as f64 * row_h + row_h / 2.0);
            let _ = writeln!(
                page,
                "<path class=\"decision\" d=\"M{:.1} {:.1} l4 -6 l-8 0 z\" fill=\"#000\"><title>{}: {} (region {} block {})</title></path>",
                cx,
                cy,
                esc(&e.name),
                esc(e.arg("reason")),
                b.0,
                b.1
            );
        }
        self.axes(&mut page, top, rows as f64 * row_h, LEFT, plot, "blocks");
        page.push_str("</svg>\n");

        // Traffic per direction over time.
        let bins = 100usize;
        let bin = self.end / bins as f64;
        let mut traffic: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
        for e in &self.events {
            if let Some(d) = Self::direction(e) {
                let i = ((e.end / bin) as usize).min(bins - 1);
                traffic.entry(d).or_insert_with(|| vec![0.0; bins])[i] += e.num("bytes");
            }
        }
        self.series_chart(
            &mut page,
            "traffic",
            "Migration traffic (MiB per interval)",
            &DIRECTIONS,
            &traffic,
            1.0 / (1 << 20) as f64,
        );

        // Faults per processor over time.
        let mut faults: BTreeMap<String, Vec<f64>> = BTreeMap::new();
        for e in self.events.iter().filter(|e| e.cat == "fault") {
            let i = ((e.ts / bin) as usize).min(bins - 1);
            faults
                .entry(e.arg("proc").to_string())
                .or_insert_with(|| vec![0.0; bins])[i] += 1.0;
        }
        let procs: Vec<(String, &str)> = faults
            .keys()
            .map(|p| (p.clone(), if p == "cpu" { "#4e79a7" } else { color_of(p) }))
            .collect();
        let names: Vec<(&str, &str)> = procs.iter().map(|(p, c)| (p.as_str(), *c)).collect();
        let faults: BTreeMap<&str, Vec<f64>> = faults
            .iter()
            .map(|(k, v)| (k.as_str(), v.clone()))
            .collect();
        self.series_chart(
            &mut page,
            "faults",
            "Faults per processor (per interval)",
            &names,
            &faults,
            1.0,
        );

        // The decisions, in words.
        page.push_str("<h2 id=\"decisions\">Policy decisions</h2><table class=\"decisions\"><tr><th>time (ms)</th><th>decision</th><th>block</th><th>reason</th></tr>\n");
        for e in self
            .events
            .iter()
            .filter(|e| e.cat == "policy" || e.cat == "evict")
            .take(200)
        {
            let _ = writeln!(
                page,
                "<tr><td>{:.3}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                e.ts / 1e3,
                esc(&e.name),
                e.block
                    .map_or(String::new(), |b| format!("{}:{}", b.0, b.1)),
                esc(e.arg("reason"))
            );
        }
        page.push_str("</table>\n<p>Open the same file in <a href=\"https://ui.perfetto.dev\">Perfetto</a> for every event.</p></body></html>\n");
        page
    }

    /// A time axis under a plot, and the left label.
    fn axes(&self, page: &mut String, top: f64, height: f64, left: f64, plot: f64, label: &str) {
        let y = top + height;
        let _ = writeln!(
            page,
            "<g class=\"axis\"><line x1=\"{left}\" y1=\"{y:.1}\" x2=\"{:.1}\" y2=\"{y:.1}\" stroke=\"#444\"/><line x1=\"{left}\" y1=\"{top}\" x2=\"{left}\" y2=\"{y:.1}\" stroke=\"#444\"/>",
            left + plot
        );
        for i in 0..=5 {
            let t = self.end * i as f64 / 5.0;
            let tx = left + plot * i as f64 / 5.0;
            let _ = writeln!(
                page,
                "<line x1=\"{tx:.1}\" y1=\"{y:.1}\" x2=\"{tx:.1}\" y2=\"{:.1}\" stroke=\"#444\"/><text x=\"{tx:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{:.2} ms</text>",
                y + 4.0,
                y + 16.0,
                t / 1e3
            );
        }
        let _ = writeln!(
            page,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{label}</text><text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">time</text></g>",
            left - 6.0,
            top + 10.0,
            left + plot / 2.0,
            y + 32.0
        );
    }

    /// A line chart of per-interval series.
    fn series_chart(
        &self,
        page: &mut String,
        class: &str,
        title: &str,
        series: &[(&str, &str)],
        data: &BTreeMap<&str, Vec<f64>>,
        scale: f64,
    ) {
        const W: f64 = 1100.0;
        const LEFT: f64 = 90.0;
        let plot = W - LEFT - 50.0;
        let (top, height) = (16.0, 180.0);
        let max = data
            .values()
            .flat_map(|v| v.iter())
            .fold(0.0f64, |m, &x| m.max(x * scale))
            .max(1e-9);
        let _ = write!(
            page,
            "<h2 id=\"{class}\">{title}</h2>\n<div class=\"legend\">"
        );
        for (name, c) in series {
            let _ = write!(
                page,
                "<span><i class=\"sw\" style=\"background:{c}\"></i>{}</span>",
                esc(name)
            );
        }
        let _ = writeln!(
            page,
            "</div>\n<svg class=\"{class}\" width=\"{W}\" height=\"{:.0}\" role=\"img\" aria-label=\"{}\">",
            top + height + 40.0,
            esc(title)
        );
        for (name, c) in series {
            let Some(v) = data.get(name) else { continue };
            let n = v.len().max(1) as f64;
            let pts: Vec<String> = v
                .iter()
                .enumerate()
                .map(|(i, &y)| {
                    format!(
                        "{:.1},{:.1}",
                        LEFT + plot * (i as f64 + 0.5) / n,
                        top + height - y * scale / max * height
                    )
                })
                .collect();
            let _ = writeln!(
                page,
                "<polyline class=\"series\" fill=\"none\" stroke=\"{c}\" stroke-width=\"1.5\" points=\"{}\"><title>{}</title></polyline>",
                pts.join(" "),
                esc(name)
            );
        }
        let _ = writeln!(
            page,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{:.1}</text><text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">0</text>",
            LEFT - 6.0,
            top + 4.0,
            max,
            LEFT - 6.0,
            top + height
        );
        self.axes(page, top, height, LEFT, plot, "");
        page.push_str("</svg>\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small trace with one event of each kind the page draws.
    fn sample() -> String {
        let ev = |cat: &str, name: &str, ts: f64, dur: f64, args: &str| {
            format!(
                "{{\"ph\":\"X\",\"cat\":\"{cat}\",\"name\":\"{name}\",\"ts\":{ts},\"dur\":{dur},\"pid\":1,\"tid\":2,\"args\":{{{args}}}}}"
            )
        };
        let events = [
            ev("fault", "cpu fault", 1.0, 2.0, "\"proc\":\"cpu\",\"region\":1,\"block\":0"),
            ev("fill", "zero fill", 2.0, 1.0, "\"region\":1,\"block\":0,\"from\":\"zero\",\"to\":\"system\",\"bytes\":4096,\"result\":\"ok\""),
            ev("fault", "device fault", 10.0, 5.0, "\"proc\":\"dev0\",\"region\":1,\"block\":0"),
            ev("migrate", "migrate", 11.0, 3.0, "\"region\":1,\"block\":0,\"from\":\"system\",\"to\":\"dev0\",\"bytes\":2097152,\"result\":\"ok\""),
            ev("migrate", "migrate", 30.0, 3.0, "\"region\":1,\"block\":0,\"from\":\"dev0\",\"to\":\"system\",\"bytes\":2097152,\"result\":\"ok\""),
            ev("evict", "evict block", 20.0, 4.0, "\"region\":1,\"block\":1,\"reason\":\"device full\""),
            ev("launch", "kernel_read", 9.0, 20.0, "\"dev\":\"dev0\""),
            "{\"ph\":\"i\",\"cat\":\"policy\",\"name\":\"read-back window\",\"ts\":29,\"s\":\"t\",\"pid\":1,\"tid\":2,\"args\":{\"region\":1,\"block\":0,\"reason\":\"only on the device\"}}".to_string(),
            "{\"ph\":\"i\",\"cat\":\"invalidate\",\"name\":\"discard\",\"ts\":40,\"s\":\"t\",\"pid\":1,\"tid\":2,\"args\":{\"region\":1,\"block\":0}}".to_string(),
            ev("fault", "cpu fault", 50.0, 2.0, "\"proc\":\"cpu\",\"region\":1,\"block\":1"),
        ];
        format!("{{\"traceEvents\":[\n{}\n]}}", events.join(",\n"))
    }

    #[test]
    fn the_page_has_every_part_a_reader_needs() {
        let t = Trace::parse(&sample()).unwrap();
        let page = t.html(Path::new("sample.json"));
        for part in [
            "<svg class=\"residency\"",
            "<svg class=\"traffic\"",
            "<svg class=\"faults\"",
            "class=\"legend\"",
            "class=\"axis\"",
            "class=\"decision\"",
            "class=\"launch\"",
            "class=\"decisions\"",
            "ms</text>",
        ] {
            assert!(page.contains(part), "the page lacks {part}");
        }
        // Every event type of the sample shows up in the summary.
        for name in [
            "cpu fault",
            "zero fill",
            "device fault",
            "migrate",
            "evict block",
            "kernel_read",
            "read-back window",
            "discard",
        ] {
            assert!(page.contains(&format!("<td>{name}</td>")), "{name} missing");
        }
        // Block 0 goes system -> dev0 -> system -> none: four coloured segments.
        let segs = page.matches("class=\"seg\"").count();
        assert_eq!(segs, 4, "residency segments");
        assert!(page.contains(color_of("dev0")) && page.contains(color_of("system")));
        // Both directions of traffic are drawn.
        assert_eq!(page.matches("class=\"series\"").count(), 2 + 2);
        assert!(
            !page.contains("http://") && !page.contains("<script"),
            "fetches nothing"
        );
    }

    #[test]
    fn a_file_cut_short_is_read() {
        let full = sample();
        let cut = full.trim_end().trim_end_matches("]}");
        let t = Trace::parse(cut).unwrap();
        assert_eq!(t.events.len(), 10);
    }
}
