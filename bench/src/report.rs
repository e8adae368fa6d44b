//! Result rows, the JSON file, the text table, and the SVG plot of latency vs concurrency.

use std::fmt::Write as _;

use serde::Serialize;

use crate::load::Sample;

#[derive(Debug, Clone, Serialize)]
pub struct Stats {
    pub ops: u64,
    pub errors: u64,
    pub ops_per_sec: f64,
    pub mean_us: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_rss_kib: Option<u64>,
}

impl From<&Sample> for Stats {
    fn from(s: &Sample) -> Self {
        let us = |ns: u64| ns as f64 / 1000.0;
        let h = &s.hist;
        Stats {
            ops: s.ops,
            errors: s.errors,
            ops_per_sec: if s.seconds > 0.0 {
                s.ops as f64 / s.seconds
            } else {
                0.0
            },
            mean_us: h.mean() / 1000.0,
            p50_us: us(h.value_at_quantile(0.50)),
            p90_us: us(h.value_at_quantile(0.90)),
            p99_us: us(h.value_at_quantile(0.99)),
            p999_us: us(h.value_at_quantile(0.999)),
            max_us: us(h.max()),
            max_rss_kib: s.max_rss_kib,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub scenario: &'static str,
    pub concurrency: usize,
    pub connections: usize,
    pub plugin: Stats,
    pub floor: Stats,
    /// plugin p50 / floor p50 (1.0 = as fast as the floor).
    pub p50_ratio: f64,
    pub p99_ratio: f64,
    /// floor ops/s / plugin ops/s (1.0 = same throughput).
    pub throughput_ratio: f64,
}

impl Row {
    pub fn new(
        scenario: &'static str,
        concurrency: usize,
        connections: usize,
        plugin: &Sample,
        floor: &Sample,
    ) -> Row {
        let (p, f) = (Stats::from(plugin), Stats::from(floor));
        Row {
            scenario,
            concurrency,
            connections,
            p50_ratio: p.p50_us / f.p50_us,
            p99_ratio: p.p99_us / f.p99_us,
            throughput_ratio: f.ops_per_sec / p.ops_per_sec,
            plugin: p,
            floor: f,
        }
    }
}

pub fn table_header() -> String {
    format!(
        "{:<12} {:>4} {:>5} | {:>9} {:>8} {:>8} {:>8} | {:>9} {:>8} {:>8} {:>8} | {:>6} {:>6} {:>6}",
        "scenario",
        "conc",
        "conns",
        "plugin/s",
        "p50us",
        "p99us",
        "p999us",
        "floor/s",
        "p50us",
        "p99us",
        "p999us",
        "p50x",
        "p99x",
        "tputx"
    )
}

pub fn table_line(r: &Row) -> String {
    format!(
        "{:<12} {:>4} {:>5} | {:>9.0} {:>8.1} {:>8.1} {:>8.1} | {:>9.0} {:>8.1} {:>8.1} {:>8.1} | {:>6.2} {:>6.2} {:>6.2}",
        r.scenario,
        r.concurrency,
        r.connections,
        r.plugin.ops_per_sec,
        r.plugin.p50_us,
        r.plugin.p99_us,
        r.plugin.p999_us,
        r.floor.ops_per_sec,
        r.floor.p50_us,
        r.floor.p99_us,
        r.floor.p999_us,
        r.p50_ratio,
        r.p99_ratio,
        r.throughput_ratio
    )
}

/// Small multiples: one panel per scenario, log-log, p50 (solid) and p99 (dashed) for plugin and floor.
pub fn svg(rows: &[Row], title: &str) -> String {
    let mut scenarios: Vec<&'static str> = Vec::new();
    for r in rows {
        if !scenarios.contains(&r.scenario) {
            scenarios.push(r.scenario);
        }
    }
    let (pw, ph) = (380.0, 260.0);
    let cols = 3usize;
    let nrows = scenarios.len().div_ceil(cols).max(1);
    let (top, w) = (70.0, pw * cols as f64);
    let h = top + ph * nrows as f64 + 10.0;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="11">"##
    );
    let _ = writeln!(s, r##"<rect width="{w}" height="{h}" fill="white"/>"##);
    let _ = writeln!(
        s,
        r##"<text x="10" y="20" font-size="14" font-weight="bold">{}</text>"##,
        esc(title)
    );
    let legend = [
        ("#1f5fbf", "", "plugin p50"),
        ("#1f5fbf", "6,4", "plugin p99"),
        ("#888888", "", "floor p50"),
        ("#888888", "6,4", "floor p99"),
    ];
    for (i, (color, dash, label)) in legend.iter().enumerate() {
        let x = 10.0 + i as f64 * 130.0;
        let _ = writeln!(
            s,
            r##"<line x1="{x}" y1="42" x2="{}" y2="42" stroke="{color}" stroke-width="2" stroke-dasharray="{dash}"/><text x="{}" y="46">{label}</text>"##,
            x + 30.0,
            x + 36.0
        );
    }
    let _ = writeln!(
        s,
        r##"<text x="540" y="46" fill="#444">x: concurrent clients (log), y: latency in µs (log)</text>"##
    );
    for (i, scen) in scenarios.iter().enumerate() {
        let ox = (i % cols) as f64 * pw;
        let oy = top + (i / cols) as f64 * ph;
        let rs: Vec<&Row> = rows
            .iter()
            .filter(|r| r.scenario == *scen && r.connections == r.concurrency)
            .collect();
        panel(&mut s, scen, &rs, ox, oy, pw, ph);
    }
    s.push_str("</svg>\n");
    s
}

fn esc(t: &str) -> String {
    t.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn panel(s: &mut String, name: &str, rows: &[&Row], ox: f64, oy: f64, pw: f64, ph: f64) {
    let (l, r, t, b) = (ox + 55.0, ox + pw - 15.0, oy + 25.0, oy + ph - 35.0);
    let _ = writeln!(
        s,
        r##"<text x="{}" y="{}" font-size="12" font-weight="bold">{}</text>"##,
        l,
        oy + 15.0,
        esc(name)
    );
    if rows.is_empty() {
        return;
    }
    let xs: Vec<f64> = rows.iter().map(|r| (r.concurrency as f64).log2()).collect();
    let (xmin, xmax) = (
        xs.iter().cloned().fold(f64::INFINITY, f64::min),
        xs.iter().cloned().fold(f64::NEG_INFINITY, f64::max),
    );
    let vals = rows.iter().flat_map(|r| {
        [
            r.plugin.p50_us,
            r.plugin.p99_us,
            r.floor.p50_us,
            r.floor.p99_us,
        ]
    });
    let (mut vmin, mut vmax) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in vals.filter(|v| *v > 0.0) {
        vmin = vmin.min(v);
        vmax = vmax.max(v);
    }
    let (ymin, ymax) = (
        vmin.log10().floor(),
        vmax.log10().ceil().max(vmin.log10().floor() + 1.0),
    );
    let px = |x: f64| {
        if xmax > xmin {
            l + (x - xmin) / (xmax - xmin) * (r - l)
        } else {
            (l + r) / 2.0
        }
    };
    let py = |v: f64| b - (v.max(1e-9).log10() - ymin) / (ymax - ymin) * (b - t);
    let _ = writeln!(
        s,
        r##"<rect x="{l}" y="{t}" width="{}" height="{}" fill="none" stroke="#333"/>"##,
        r - l,
        b - t
    );
    // Decade grid lines with 2 and 5 minor lines.
    let mut d = ymin;
    while d <= ymax {
        let y = py(10f64.powf(d));
        let _ = writeln!(
            s,
            r##"<line x1="{l}" y1="{y}" x2="{r}" y2="{y}" stroke="#ddd"/><text x="{}" y="{}" text-anchor="end">{}</text>"##,
            l - 4.0,
            y + 4.0,
            fmt_us(10f64.powf(d))
        );
        for m in [2.0, 5.0] {
            let v = m * 10f64.powf(d);
            if v.log10() < ymax {
                let y = py(v);
                let _ = writeln!(
                    s,
                    r##"<line x1="{l}" y1="{y}" x2="{r}" y2="{y}" stroke="#f0f0f0"/><text x="{}" y="{}" text-anchor="end" fill="#999" font-size="9">{}</text>"##,
                    l - 4.0,
                    y + 3.0,
                    fmt_us(v)
                );
            }
        }
        d += 1.0;
    }
    for (row, x) in rows.iter().zip(&xs) {
        let _ = writeln!(
            s,
            r##"<text x="{}" y="{}" text-anchor="middle">{}</text>"##,
            px(*x),
            b + 14.0,
            row.concurrency
        );
    }
    type Pick = fn(&Row) -> f64;
    let series: [(&str, &str, Pick); 4] = [
        ("#888888", "", |r| r.floor.p50_us),
        ("#888888", "6,4", |r| r.floor.p99_us),
        ("#1f5fbf", "", |r| r.plugin.p50_us),
        ("#1f5fbf", "6,4", |r| r.plugin.p99_us),
    ];
    for (color, dash, pick) in series {
        let pts: Vec<String> = rows
            .iter()
            .zip(&xs)
            .map(|(row, x)| format!("{:.1},{:.1}", px(*x), py(pick(row))))
            .collect();
        let _ = writeln!(
            s,
            r##"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2" stroke-dasharray="{dash}"/>"##,
            pts.join(" ")
        );
        for p in &pts {
            let (x, y) = p.split_once(',').unwrap_or(("0", "0"));
            let _ = writeln!(s, r##"<circle cx="{x}" cy="{y}" r="2.5" fill="{color}"/>"##);
        }
    }
    let _ = writeln!(
        s,
        r##"<text x="{}" y="{}" text-anchor="middle" fill="#444">concurrency</text>"##,
        (l + r) / 2.0,
        b + 28.0
    );
}

fn fmt_us(v: f64) -> String {
    if v >= 1e6 {
        format!("{}s", v / 1e6)
    } else if v >= 1000.0 {
        format!("{}ms", v / 1000.0)
    } else {
        format!("{v}µs")
    }
}
