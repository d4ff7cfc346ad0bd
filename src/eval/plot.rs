//! SVG plots written by hand (no plotting dependency): stance per axis along a sweep, and the
//! two-axis compass scatter of the path with the base and both experts marked.

use std::fmt::Write;

use super::sweep::{SweepPoint, SweepReport};

const COLORS: [&str; 6] = [
    "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b",
];
const PRO_COLOR: &str = "#1f5fbf";
const CON_COLOR: &str = "#c0392b";

/// Text safe inside SVG.
fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A plotting area: data ranges mapped onto a pixel rectangle.
struct Frame {
    x0: f64,
    y0: f64,
    w: f64,
    h: f64,
    xr: (f64, f64),
    yr: (f64, f64),
}

impl Frame {
    fn px(&self, x: f64) -> f64 {
        self.x0 + (x - self.xr.0) / (self.xr.1 - self.xr.0) * self.w
    }
    fn py(&self, y: f64) -> f64 {
        self.y0 + self.h - (y - self.yr.0) / (self.yr.1 - self.yr.0) * self.h
    }

    /// Border, grid, tick labels and axis titles.
    fn axes(&self, s: &mut String, xlabel: &str, ylabel: &str, title: &str) {
        let _ = write!(
            s,
            r##"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="white" stroke="#333"/>"##,
            self.x0, self.y0, self.w, self.h
        );
        for k in 0..=4 {
            let t = k as f64 / 4.0;
            let (xv, yv) = (
                self.xr.0 + t * (self.xr.1 - self.xr.0),
                self.yr.0 + t * (self.yr.1 - self.yr.0),
            );
            let (x, y) = (self.px(xv), self.py(yv));
            let _ = write!(
                s,
                r##"<line x1="{x:.1}" y1="{:.1}" x2="{x:.1}" y2="{:.1}" stroke="#ddd"/><text x="{x:.1}" y="{:.1}" font-size="11" text-anchor="middle">{}</text>"##,
                self.y0,
                self.y0 + self.h,
                self.y0 + self.h + 15.0,
                tick(xv)
            );
            let _ = write!(
                s,
                r##"<line x1="{:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" font-size="11" text-anchor="end">{}</text>"##,
                self.x0,
                self.x0 + self.w,
                self.x0 - 5.0,
                y + 4.0,
                tick(yv)
            );
        }
        let _ = write!(
            s,
            r#"<text x="{:.1}" y="{:.1}" font-size="12" text-anchor="middle">{}</text>"#,
            self.x0 + self.w / 2.0,
            self.y0 + self.h + 34.0,
            esc(xlabel)
        );
        let (lx, ly) = (self.x0 - 42.0, self.y0 + self.h / 2.0);
        let _ = write!(
            s,
            r#"<text x="{lx:.1}" y="{ly:.1}" font-size="12" text-anchor="middle" transform="rotate(-90 {lx:.1} {ly:.1})">{}</text>"#,
            esc(ylabel)
        );
        let _ = write!(
            s,
            r#"<text x="{:.1}" y="{:.1}" font-size="14" font-weight="bold" text-anchor="middle">{}</text>"#,
            self.x0 + self.w / 2.0,
            self.y0 - 10.0,
            esc(title)
        );
    }

    /// A dashed zero line inside the frame, when zero is in range.
    fn zero_lines(&self, s: &mut String) {
        if self.yr.0 < 0.0 && self.yr.1 > 0.0 {
            let y = self.py(0.0);
            let _ = write!(
                s,
                r##"<line x1="{:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#888" stroke-dasharray="4 3"/>"##,
                self.x0,
                self.x0 + self.w
            );
        }
        if self.xr.0 < 0.0 && self.xr.1 > 0.0 {
            let x = self.px(0.0);
            let _ = write!(
                s,
                r##"<line x1="{x:.1}" y1="{:.1}" x2="{x:.1}" y2="{:.1}" stroke="#888" stroke-dasharray="4 3"/>"##,
                self.y0,
                self.y0 + self.h
            );
        }
    }
}

fn tick(v: f64) -> String {
    let r = (v * 100.0).round() / 100.0;
    if r == r.trunc() {
        format!("{}", r as i64)
    } else {
        format!("{r}")
    }
}

/// `(lo, hi)` of `v` padded by 8% (or by 0.5 when flat).
fn extent(v: impl Iterator<Item = f64>) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for x in v.filter(|x| x.is_finite()) {
        lo = lo.min(x);
        hi = hi.max(x);
    }
    if !lo.is_finite() {
        return (-1.0, 1.0);
    }
    let pad = if hi > lo { (hi - lo) * 0.08 } else { 0.5 };
    (lo - pad, hi + pad)
}

/// The sweep as one SVG: stance per axis against the path (with 95% intervals over
/// templates) and, with two or more axes, the compass scatter of the first two.
pub fn sweep_svg(r: &SweepReport) -> String {
    let axes: Vec<&String> = r.spearman.keys().collect();
    let compass = axes.len() >= 2;
    let width = if compass { 960.0 } else { 520.0 };
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="430" viewBox="0 0 {width} 430" font-family="sans-serif">"#
    );
    let _ = write!(
        s,
        r#"<title>{} sweep {}</title><rect width="100%" height="100%" fill="white"/>"#,
        esc(&r.instrument),
        esc(&r.path)
    );
    // Left: stance per axis along the path.
    let xr = extent(r.points.iter().map(|p| p.x));
    let xr = if r.points.len() > 1 {
        let (a, b) = (r.points[0].x, r.points[r.points.len() - 1].x);
        (a.min(b), a.max(b)).max_spread(xr)
    } else {
        xr
    };
    let yr = match axes
        .iter()
        .map(|a| r.ranges.get(*a))
        .collect::<Option<Vec<_>>>()
    {
        Some(rs) if !rs.is_empty() => (
            rs.iter().map(|x| x[0]).fold(f64::INFINITY, f64::min),
            rs.iter().map(|x| x[1]).fold(f64::NEG_INFINITY, f64::max),
        ),
        _ => extent(r.points.iter().flat_map(|p| {
            p.axes
                .values()
                .flat_map(|a| [a.expected - a.expected_ci95, a.expected + a.expected_ci95])
                .collect::<Vec<_>>()
        })),
    };
    let f = Frame {
        x0: 70.0,
        y0: 40.0,
        w: 380.0,
        h: 320.0,
        xr,
        yr,
    };
    let sign = if r.sign.is_empty() {
        "score".to_string()
    } else {
        format!("score ({})", r.sign)
    };
    f.axes(
        &mut s,
        &r.kind,
        &sign,
        &format!("Stance along the {} path", r.kind),
    );
    f.zero_lines(&mut s);
    for (k, axis) in axes.iter().enumerate() {
        let c = COLORS[k % COLORS.len()];
        let pts: Vec<String> = r
            .points
            .iter()
            .map(|p| format!("{:.1},{:.1}", f.px(p.x), f.py(p.axes[*axis].expected)))
            .collect();
        let _ = write!(
            s,
            r#"<polyline points="{}" fill="none" stroke="{c}" stroke-width="2"/>"#,
            pts.join(" ")
        );
        for p in &r.points {
            let a = &p.axes[*axis];
            let x = f.px(p.x);
            let _ = write!(
                s,
                r#"<line x1="{x:.1}" y1="{:.1}" x2="{x:.1}" y2="{:.1}" stroke="{c}"/><circle cx="{x:.1}" cy="{:.1}" r="3.5" fill="{c}"><title>{}: {} {:.2} +- {:.2}</title></circle>"#,
                f.py(a.expected - a.expected_ci95),
                f.py(a.expected + a.expected_ci95),
                f.py(a.expected),
                esc(&p.blend),
                esc(axis),
                a.expected,
                a.expected_ci95
            );
        }
        let rho = r.spearman[*axis].map_or("n/a".into(), |v| format!("{v:.2}"));
        let _ = write!(
            s,
            r#"<rect x="{:.1}" y="{:.1}" width="12" height="3" fill="{c}"/><text x="{:.1}" y="{:.1}" font-size="11">{} (Spearman {rho})</text>"#,
            f.x0 + 10.0,
            f.y0 + 14.0 + 16.0 * k as f64,
            f.x0 + 28.0,
            f.y0 + 19.0 + 16.0 * k as f64,
            esc(axis)
        );
    }
    if compass {
        compass_panel(&mut s, r, axes[0], axes[1]);
    }
    s.push_str("</svg>\n");
    s
}

trait Spread {
    fn max_spread(self, other: (f64, f64)) -> (f64, f64);
}

impl Spread for (f64, f64) {
    /// `self` when it spans something, else `other`.
    fn max_spread(self, other: (f64, f64)) -> (f64, f64) {
        if self.1 > self.0 {
            self
        } else {
            other
        }
    }
}

fn compass_panel(s: &mut String, r: &SweepReport, ax: &str, ay: &str) {
    let refs: Vec<&SweepPoint> = [
        Some(&r.base),
        r.progressive.as_ref(),
        r.conservative.as_ref(),
    ]
    .into_iter()
    .flatten()
    .collect();
    let all: Vec<&SweepPoint> = r.points.iter().chain(refs.iter().copied()).collect();
    let range = |a: &str| match r.ranges.get(a) {
        Some(x) => (x[0], x[1]),
        None => extent(all.iter().map(|p| p.axes[a].expected)),
    };
    let f = Frame {
        x0: 560.0,
        y0: 40.0,
        w: 320.0,
        h: 320.0,
        xr: range(ax),
        yr: range(ay),
    };
    f.axes(s, ax, ay, "Compass");
    f.zero_lines(s);
    let xy = |p: &SweepPoint| (f.px(p.axes[ax].expected), f.py(p.axes[ay].expected));
    let pts: Vec<String> = r
        .points
        .iter()
        .map(|p| {
            let (x, y) = xy(p);
            format!("{x:.1},{y:.1}")
        })
        .collect();
    let _ = write!(
        s,
        r##"<polyline points="{}" fill="none" stroke="#777" stroke-width="1.5"/>"##,
        pts.join(" ")
    );
    for p in &r.points {
        let (x, y) = xy(p);
        let _ = write!(
            s,
            r##"<circle cx="{x:.1}" cy="{y:.1}" r="3" fill="#777"><title>{}</title></circle>"##,
            esc(&p.blend)
        );
    }
    for (i, p) in [r.points.first(), r.points.last()]
        .into_iter()
        .flatten()
        .enumerate()
    {
        let (x, y) = xy(p);
        let _ = write!(
            s,
            r##"<text x="{:.1}" y="{:.1}" font-size="10" fill="#555">{}</text>"##,
            x + 6.0,
            y + if i == 0 { 12.0 } else { -6.0 },
            esc(p.blend.split(" | ").next().unwrap_or(&p.blend))
        );
    }
    let mut legend = Vec::new();
    let (bx, by) = xy(&r.base);
    let _ = write!(
        s,
        r##"<circle cx="{bx:.1}" cy="{by:.1}" r="6" fill="none" stroke="black" stroke-width="2"/>"##
    );
    legend.push((
        r##"<circle cx="6" cy="-4" r="5" fill="none" stroke="black" stroke-width="2"/>"##
            .to_string(),
        "base",
    ));
    if let Some(p) = &r.progressive {
        let (x, y) = xy(p);
        let _ = write!(
            s,
            r#"<polygon points="{:.1},{:.1} {:.1},{:.1} {:.1},{:.1}" fill="{PRO_COLOR}"/>"#,
            x,
            y - 7.0,
            x - 6.5,
            y + 5.0,
            x + 6.5,
            y + 5.0
        );
        legend.push((
            format!(r#"<polygon points="6,-11 0,1 12,1" fill="{PRO_COLOR}"/>"#),
            "progressive expert",
        ));
    }
    if let Some(p) = &r.conservative {
        let (x, y) = xy(p);
        let _ = write!(
            s,
            r#"<rect x="{:.1}" y="{:.1}" width="11" height="11" fill="{CON_COLOR}"/>"#,
            x - 5.5,
            y - 5.5
        );
        legend.push((
            format!(r#"<rect x="0" y="-10" width="11" height="11" fill="{CON_COLOR}"/>"#),
            "conservative expert",
        ));
    }
    for (k, (shape, label)) in legend.iter().enumerate() {
        let _ = write!(
            s,
            r#"<g transform="translate({:.1} {:.1})">{shape}<text x="18" y="0" font-size="11">{label}</text></g>"#,
            f.x0 - 40.0 + 130.0 * k as f64,
            f.y0 + f.h + 58.0
        );
    }
}
