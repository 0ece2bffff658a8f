//! Throughput over time as SVG drawn on the server, from serve's observation samples.

use super::html::{esc, int};
use tally::store::dashboard::Sample;

const W: f64 = 640.0;
const H: f64 = 160.0;
/// Left margin for the rate labels.
const LEFT: f64 = 56.0;

/// Records finished per second between consecutive samples, as (unix seconds, rate).
pub fn rates(samples: &[Sample]) -> Vec<(f64, f64)> {
    samples
        .windows(2)
        .filter(|w| w[1].at > w[0].at)
        .map(|w| {
            let dt = w[1].at - w[0].at;
            (w[1].at, (w[1].done - w[0].done).max(0) as f64 / dt)
        })
        .collect()
}

/// A line chart of `rates`, or a note when there are too few samples.
pub fn throughput(samples: &[Sample]) -> String {
    let points = rates(samples);
    if points.len() < 2 {
        return "<p class=\"muted\">Not enough samples yet: serve records one per batch each \
                check interval while the batch runs.</p>"
            .into();
    }
    let (t0, t1) = (points[0].0, points[points.len() - 1].0);
    let span = (t1 - t0).max(1.0);
    let top = points.iter().map(|p| p.1).fold(0.0, f64::max).max(1.0);
    let x = |t: f64| LEFT + (t - t0) / span * (W - LEFT - 8.0);
    let y = |r: f64| H - 20.0 - r / top * (H - 30.0);
    let line: Vec<String> = points
        .iter()
        .map(|&(t, r)| format!("{:.1},{:.1}", x(t), y(r)))
        .collect();
    let area = format!(
        "{:.1},{:.1} {} {:.1},{:.1}",
        x(t0),
        y(0.0),
        line.join(" "),
        x(t1),
        y(0.0)
    );
    let minutes = span / 60.0;
    format!(
        "<svg class=\"chart\" viewBox=\"0 0 {W} {H}\" role=\"img\" aria-label=\"records per second\">\
         <line class=\"axis\" x1=\"{LEFT}\" y1=\"{b:.1}\" x2=\"{W}\" y2=\"{b:.1}\"></line>\
         <line class=\"grid\" x1=\"{LEFT}\" y1=\"{t:.1}\" x2=\"{W}\" y2=\"{t:.1}\"></line>\
         <text x=\"{lx}\" y=\"{ty:.1}\" text-anchor=\"end\">{top}/s</text>\
         <text x=\"{lx}\" y=\"{b:.1}\" text-anchor=\"end\">0</text>\
         <text x=\"{LEFT}\" y=\"{H}\">{ago} ago</text>\
         <text x=\"{W}\" y=\"{H}\" text-anchor=\"end\">now</text>\
         <polygon class=\"area\" points=\"{area}\"></polygon>\
         <polyline class=\"line\" points=\"{line}\"></polyline></svg>",
        b = y(0.0),
        t = y(top),
        ty = y(top) + 4.0,
        lx = LEFT - 6.0,
        top = esc(&int(top.round() as i64)),
        ago = esc(&tally::model::human_duration(minutes * 60.0)),
        line = line.join(" "),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(at: f64, done: i64) -> Sample {
        Sample {
            at,
            done,
            failed: 0,
        }
    }

    #[test]
    fn rates_come_from_consecutive_samples() {
        let r = rates(&[s(0.0, 0), s(10.0, 100), s(20.0, 100), s(30.0, 400)]);
        assert_eq!(r, vec![(10.0, 10.0), (20.0, 0.0), (30.0, 30.0)]);
        assert!(throughput(&[s(0.0, 0), s(10.0, 5)]).contains("Not enough samples"));
        let svg = throughput(&[s(0.0, 0), s(10.0, 100), s(20.0, 400)]);
        assert!(svg.contains(">30/s<"), "{svg}");
    }
}
