//! `hetmem bench --plot FILE.svg`: the rows' ratios as one self-contained SVG bar chart (or an
//! HTML page holding it, for a name ending in `.html`), drawn from a run's rows or from a saved
//! `--json` file (`--from`), so a GPU run's JSON can be drawn anywhere later.
//!
//! Each bar is hetmem against its baseline on a log scale, oriented so that longer to the right
//! is better: the ratio for rows where higher is better, its inverse where lower is better (a
//! latency). The colour says what the baseline is: a pinned copy (the PCIe limit), CUDA managed
//! memory, or another baseline. A dark tick marks the target. No dependency: the SVG is text.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context as _, Result};
use serde_json::Value;

use crate::report::{Row, Target};

/// What one bar needs.
#[derive(Debug, Clone)]
pub struct PlotRow {
    pub id: String,
    pub name: String,
    pub unit: String,
    pub hetmem: f64,
    pub baseline: Option<f64>,
    pub ratio: Option<f64>,
    pub target: Target,
    pub pass: Option<bool>,
    pub baseline_name: String,
    /// `pinned`, `managed` or anything else.
    pub against: String,
    pub not_built: Option<String>,
    /// Measured runs behind the median.
    pub runs: usize,
}

impl PlotRow {
    pub fn from_row(r: &Row) -> PlotRow {
        PlotRow {
            id: r.id.clone(),
            name: r.name.clone(),
            unit: r.unit.clone(),
            hetmem: r.hetmem,
            baseline: r.baseline,
            ratio: r.ratio,
            target: r.target,
            pass: r.pass,
            baseline_name: r.baseline_name.clone(),
            against: r.against.clone().unwrap_or_default(),
            not_built: r.not_built.clone(),
            runs: r.hetmem_samples.len(),
        }
    }

    /// A row of a saved report; `None` for one without an id.
    pub fn from_json(v: &Value) -> Option<PlotRow> {
        let s = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_string();
        let f = |k: &str| v.get(k).and_then(Value::as_f64);
        Some(PlotRow {
            id: v.get("id")?.as_str()?.to_string(),
            name: s("name"),
            unit: s("unit"),
            hetmem: f("hetmem").unwrap_or(0.0),
            baseline: f("baseline"),
            ratio: f("ratio"),
            target: v
                .get("target")
                .and_then(|t| serde_json::from_value(t.clone()).ok())
                .unwrap_or(Target::None),
            pass: v.get("pass").and_then(Value::as_bool),
            baseline_name: s("baseline_name"),
            against: s("against"),
            not_built: v
                .get("not_built")
                .and_then(Value::as_str)
                .map(str::to_string),
            runs: v
                .get("hetmem_samples")
                .and_then(Value::as_array)
                .map_or(0, Vec::len),
        })
    }

    /// The bar's length: how many times better than the baseline hetmem is (higher is better).
    fn score(&self) -> Option<f64> {
        let r = self.ratio.filter(|r| r.is_finite() && *r > 0.0)?;
        Some(if self.target.lower_is_better() {
            1.0 / r
        } else {
            r
        })
    }

    /// Where the target lies on the same scale.
    fn target_score(&self) -> Option<f64> {
        let t = match self.target {
            Target::AtLeast(t) => t,
            Target::AtMost(t) => 1.0 / t,
            Target::AtMostAbove(d) => {
                let b = self.baseline?;
                b / (b + d)
            }
            Target::None => return None,
        };
        (t.is_finite() && t > 0.0).then_some(t)
    }
}

/// Escapes text for SVG/XML.
fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// `s` cut to `n` characters, with an ellipsis when cut.
fn cut(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(n.saturating_sub(1)).collect();
        t.push('…');
        t
    }
}

/// `s` in lines of at most `n` characters, broken at spaces, at most `lines` of them (the
/// last cut with an ellipsis when the text goes on).
fn wrap(s: &str, n: usize, lines: usize) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut cur = String::new();
    for word in s.split_whitespace() {
        if !cur.is_empty() && cur.chars().count() + 1 + word.chars().count() > n {
            out.push(std::mem::take(&mut cur));
        }
        if !cur.is_empty() {
            cur.push(' ');
        }
        cur.push_str(word);
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    if out.len() > lines {
        let rest = out[lines - 1..].join(" ");
        out.truncate(lines - 1);
        out.push(rest);
    }
    if let Some(l) = out.last_mut() {
        *l = cut(l, n);
    }
    out
}

/// The baseline kinds and their colours, in legend order.
const KINDS: [(&str, &str, &str); 3] = [
    ("pinned", "#1f77b4", "pinned copy (the PCIe limit)"),
    ("managed", "#ff7f0e", "CUDA managed memory"),
    (
        "",
        "#8c8c8c",
        "other baseline (pipeline, plain launch, raw userfaultfd, memcpy, migrate-on-demand)",
    ),
];

fn colour(against: &str) -> &'static str {
    KINDS
        .iter()
        .find(|(k, _, _)| !k.is_empty() && *k == against)
        .map_or(KINDS[2].1, |(_, c, _)| c)
}

/// The chart. `warning`, when given, is drawn as a red banner (a fake driver's run).
pub fn svg(title: &str, subtitle: &str, rows: &[PlotRow], warning: Option<&str>) -> String {
    let rows: Vec<&PlotRow> = rows
        .iter()
        .filter(|r| r.score().is_some() || r.not_built.is_some())
        .collect();
    // Decades shown: at least 0.1x to 10x, widened to every bar and target.
    let vals = rows
        .iter()
        .flat_map(|r| [r.score(), r.target_score()])
        .flatten();
    let (mut lo, mut hi) = (-1i32, 1i32);
    for v in vals {
        let l = v.log10();
        lo = lo.min(l.floor() as i32);
        hi = hi.max(l.ceil() as i32);
    }
    let (lo, hi) = (lo.max(-4), hi.min(4).max(lo.max(-4) + 1));
    let (w, label_w, x0, x1) = (1000.0, 470.0, 480.0, 870.0);
    let row_h = 34.0;
    let sub_lines = wrap(subtitle, 150, 3).len().max(1) as f64;
    let top = 110.0 + 15.0 * sub_lines + if warning.is_some() { 30.0 } else { 0.0 };
    let h = top + row_h * rows.len().max(1) as f64 + 70.0;
    let x = |v: f64| {
        let l = v.max(1e-9).log10().clamp(f64::from(lo), f64::from(hi));
        x0 + (l - f64::from(lo)) / f64::from(hi - lo) * (x1 - x0)
    };
    let mut s = String::new();
    let _ = write!(
        s,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="DejaVu Sans, Arial, sans-serif" font-size="12">
<rect x="0" y="0" width="{w}" height="{h}" fill="#ffffff"/>
<text x="20" y="28" font-size="17" font-weight="bold">{}</text>
"##,
        esc(title),
    );
    let sub = wrap(subtitle, 150, 3);
    for (i, l) in sub.iter().enumerate() {
        let _ = writeln!(
            s,
            r##"<text x="20" y="{}" fill="#444">{}</text>"##,
            48.0 + 15.0 * i as f64,
            esc(l)
        );
    }
    let mut y = 48.0 + 15.0 * sub.len().max(1) as f64 - 1.0;
    if let Some(wn) = warning {
        let _ = write!(
            s,
            r##"<rect x="20" y="{y}" width="{}" height="24" fill="#fde0dc" stroke="#c62828"/>
<text x="30" y="{}" fill="#c62828" font-weight="bold">{}</text>
"##,
            w - 40.0,
            y + 16.0,
            esc(wn)
        );
        y += 30.0;
    }
    // Legend.
    let mut lx = 20.0;
    for (_, c, what) in KINDS {
        let _ = writeln!(
            s,
            r##"<rect x="{lx}" y="{}" width="14" height="12" fill="{c}"/><text x="{}" y="{}">{}</text>"##,
            y + 4.0,
            lx + 19.0,
            y + 14.0,
            esc(what)
        );
        lx += 40.0 + what.chars().count() as f64 * 7.2;
    }
    let _ = writeln!(
        s,
        r##"<line x1="{lx}" y1="{}" x2="{lx}" y2="{}" stroke="#000" stroke-width="2.5"/><text x="{}" y="{}">target</text>"##,
        y + 2.0,
        y + 18.0,
        lx + 6.0,
        y + 14.0
    );
    // Axis: one grid line per decade, the baseline (1x) bold.
    let axis_y = top - 8.0;
    let bottom = top + row_h * rows.len().max(1) as f64;
    for d in lo..=hi {
        let v = 10f64.powi(d);
        let xv = x(v);
        let (stroke, sw) = if d == 0 { ("#000", 1.5) } else { ("#ccc", 1.0) };
        let label = if d < 0 {
            format!("{v:.*}×", (-d) as usize)
        } else {
            format!("{v:.0}×")
        };
        let _ = writeln!(
            s,
            r##"<line x1="{xv}" y1="{}" x2="{xv}" y2="{bottom}" stroke="{stroke}" stroke-width="{sw}"/><text x="{xv}" y="{axis_y}" text-anchor="middle" fill="#444">{label}</text>"##,
            axis_y + 4.0
        );
    }
    let _ = writeln!(
        s,
        r##"<text x="{}" y="{}" text-anchor="middle" fill="#444" font-size="11">hetmem ÷ baseline, log scale, longer to the right is better (lower-is-better rows inverted)</text>"##,
        (x0 + x1) / 2.0,
        bottom + 18.0
    );
    for (i, r) in rows.iter().enumerate() {
        let ry = top + row_h * i as f64;
        if i % 2 == 1 {
            let _ = writeln!(
                s,
                r##"<rect x="10" y="{ry}" width="{}" height="{row_h}" fill="#f6f6f6"/>"##,
                w - 20.0
            );
        }
        let label = format!("{} {}", r.id, r.name);
        let lines = wrap(&label, (label_w / 6.4) as usize, 2);
        let _ = write!(
            s,
            r##"<text x="20" y="{}" font-size="11"><title>{}</title>"##,
            ry + if lines.len() > 1 { 14.0 } else { 21.0 },
            esc(&format!("{label} | baseline: {}", r.baseline_name)),
        );
        for (j, l) in lines.iter().enumerate() {
            let _ = write!(
                s,
                r##"<tspan x="20" dy="{}">{}</tspan>"##,
                if j == 0 { 0.0 } else { 13.0 },
                esc(l)
            );
        }
        s.push_str("</text>\n");
        if let Some(why) = &r.not_built {
            let _ = writeln!(
                s,
                r##"<text x="{x0}" y="{}" fill="#888" font-style="italic" font-size="11"><title>{}</title>{}</text>"##,
                ry + 21.0,
                esc(why),
                esc(&cut(
                    &if why.starts_with("not run") {
                        why.clone()
                    } else {
                        format!("not built: {why}")
                    },
                    78
                ))
            );
            continue;
        }
        let Some(v) = r.score() else { continue };
        let (a, b) = (x(1.0).min(x(v)), x(1.0).max(x(v)));
        let _ = writeln!(
            s,
            r##"<rect x="{a}" y="{}" width="{}" height="14" fill="{}"><title>{}</title></rect>"##,
            ry + 10.0,
            (b - a).max(1.0),
            colour(&r.against),
            esc(&format!(
                "hetmem {:.3} {u}, baseline {} ({} runs)",
                r.hetmem,
                r.baseline
                    .map_or("-".into(), |b| format!("{b:.3} {}", r.unit)),
                r.runs,
                u = r.unit
            ))
        );
        if let Some(t) = r.target_score() {
            let tx = x(t);
            let _ = writeln!(
                s,
                r##"<line x1="{tx}" y1="{}" x2="{tx}" y2="{}" stroke="#000" stroke-width="2.5"/>"##,
                ry + 5.0,
                ry + 29.0
            );
        }
        let verdict = match r.pass {
            Some(true) => ("pass", "#2e7d32"),
            Some(false) => ("miss", "#c62828"),
            None => ("info", "#666"),
        };
        let _ = writeln!(
            s,
            r##"<text x="{}" y="{}">{}</text><text x="{}" y="{}" fill="{}" font-weight="bold">{}</text>"##,
            x1 + 12.0,
            ry + 21.0,
            if v >= 100.0 {
                format!("{v:.0}×")
            } else if v >= 0.01 {
                format!("{v:.2}×")
            } else {
                "&lt;0.01×".to_string()
            },
            x1 + 70.0,
            ry + 21.0,
            verdict.1,
            verdict.0
        );
    }
    if rows.is_empty() {
        let _ = writeln!(
            s,
            r##"<text x="{x0}" y="{}" fill="#888">no rows with a ratio</text>"##,
            top + 18.0
        );
    }
    s.push_str("</svg>\n");
    s
}

/// Writes the chart of `rows` to `path`: SVG, or HTML for a name ending in `.html`.
pub fn write(
    path: &Path,
    title: &str,
    subtitle: &str,
    rows: &[Row],
    warning: Option<&str>,
) -> Result<()> {
    let rows: Vec<PlotRow> = rows.iter().map(PlotRow::from_row).collect();
    write_rows(path, title, subtitle, &rows, warning)
}

fn write_rows(
    path: &Path,
    title: &str,
    subtitle: &str,
    rows: &[PlotRow],
    warning: Option<&str>,
) -> Result<()> {
    let chart = svg(title, subtitle, rows, warning);
    let html = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("html") || e.eq_ignore_ascii_case("htm"));
    let text = if html {
        format!(
            "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{}</title></head>\n<body style=\"margin:0\">\n{chart}</body></html>\n",
            esc(title)
        )
    } else {
        chart
    };
    std::fs::write(path, text).with_context(|| format!("write {}", path.display()))
}

/// `--plot OUT --from REPORT.json`: the chart of a saved report (either bench's).
pub fn from_json(from: &Path, out: &Path) -> Result<()> {
    let text = std::fs::read_to_string(from).with_context(|| format!("read {}", from.display()))?;
    let v: Value =
        serde_json::from_str(&text).with_context(|| format!("parse {}", from.display()))?;
    let rows: Vec<PlotRow> = v
        .get("rows")
        .and_then(Value::as_array)
        .context("the report has no rows")?
        .iter()
        .filter_map(PlotRow::from_json)
        .collect();
    let s = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_string();
    let title = [s("title"), s("tool")]
        .into_iter()
        .find(|t| !t.is_empty())
        .unwrap_or_else(|| "hetmem bench".to_string());
    let subtitle = match v.get("subtitle").and_then(Value::as_str) {
        Some(t) => t.to_string(),
        None => format!("from {}", from.display()),
    };
    let warning = v.get("warning").and_then(Value::as_str);
    write_rows(out, &title, &subtitle, &rows, warning)?;
    println!(
        "plot of {} rows from {} written to {}",
        rows.len(),
        from.display(),
        out.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(id: &str, ratio: f64, target: Target, against: &str) -> PlotRow {
        PlotRow {
            id: id.into(),
            name: "x < y & z".into(),
            unit: "GB/s".into(),
            hetmem: ratio,
            baseline: Some(1.0),
            ratio: Some(ratio),
            target,
            pass: target.check_values(ratio, Some(1.0)),
            baseline_name: "b".into(),
            against: against.into(),
            not_built: None,
            runs: 5,
        }
    }

    #[test]
    fn the_chart_is_escaped_and_oriented() {
        let mut nb = r("5", 1.0, Target::None, "");
        nb.ratio = None;
        nb.not_built = Some("remote placement is not built".into());
        let rows = [
            r("1a", 0.5, Target::AtLeast(0.8), "pinned"),
            r("1b", 4.0, Target::AtLeast(3.0), "managed"),
            r("6", 1.5, Target::AtMostAbove(10.0), ""),
            nb,
        ];
        let s = svg("t", "s", &rows, Some("fake"));
        assert!(s.starts_with("<svg") && s.trim_end().ends_with("</svg>"));
        assert!(s.contains("x &lt; y &amp; z"));
        assert!(!s.contains("x < y"));
        assert!(s.contains("not built: remote placement"));
        assert!(s.contains("#1f77b4") && s.contains("#ff7f0e"));
        // A latency row is drawn inverted: 1.5x the time is 0.67x.
        assert!(s.contains("0.67×"));
        assert!(s.contains("miss") && s.contains("pass"));
        // Rows read back from JSON draw the same.
        let row = Row {
            id: "1a".into(),
            name: "n".into(),
            unit: "GB/s".into(),
            hetmem: 2.0,
            baseline: Some(4.0),
            ratio: Some(0.5),
            target: Target::AtLeast(0.8),
            pass: Some(false),
            baseline_name: "pinned".into(),
            hetmem_samples: vec![2.0],
            baseline_samples: vec![4.0],
            counters: None,
            against: Some("pinned".into()),
            not_built: None,
        };
        let back = PlotRow::from_json(&serde_json::to_value(&row).unwrap()).unwrap();
        assert_eq!(back.target, Target::AtLeast(0.8));
        assert_eq!(back.against, "pinned");
        assert_eq!(back.score(), Some(0.5));
        assert_eq!(back.runs, 1);
    }
}
