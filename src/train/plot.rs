//! `loss.png` next to the checkpoints: one panel per loss part against the step, each
//! with its own y range, drawn from `metrics.jsonl` (so a resumed run plots all of its
//! steps). Drawn by hand on an RGB canvas with an 8x8 bitmap font: plotting crates need
//! a font file for any text, which a headless training box may not have.
use anyhow::{Context, Result};
use std::path::Path;

const WIDTH: usize = 800;
const PANEL_HEIGHT: usize = 170;
const TOP: usize = 36;
const LEFT: usize = 76;
const RIGHT: usize = 24;
const BOTTOM: usize = 40;
const BACKGROUND: [u8; 3] = [255, 255, 255];
const INK: [u8; 3] = [40, 40, 40];
const GRID: [u8; 3] = [225, 225, 225];
const COLORS: [[u8; 3]; 4] = [[31, 119, 180], [214, 39, 40], [44, 160, 44], [148, 103, 189]];

pub const PLOT_FILE: &str = "loss.png";

/// Redraws `output/loss.png` from `output/metrics.jsonl`.
pub fn plot_run(output: &Path) -> Result<()> {
    let series = series_from_metrics(&output.join("metrics.jsonl"))?;
    let title = format!("distill train: {}", output.file_name().unwrap_or_default().to_string_lossy());
    write_loss_plot(&series, &title, &output.join(PLOT_FILE))
}

/// A named series of (step, value) points.
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// Reads the loss parts of `metrics.jsonl` (total, KD, CE, hidden when present).
pub fn series_from_metrics(path: &Path) -> Result<Vec<Series>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut out: Vec<Series> =
        ["loss", "kd", "ce", "hidden"].iter().map(|n| Series { name: n.to_string(), points: vec![] }).collect();
    for (i, line) in text.lines().enumerate() {
        let v: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("{}: line {} is not JSON", path.display(), i + 1))?;
        let step = v["step"].as_f64().unwrap_or(i as f64 + 1.0);
        for s in &mut out {
            if let Some(x) = v[&s.name].as_f64().filter(|x| x.is_finite()) {
                s.points.push((step, x));
            }
        }
    }
    // A part that is zero throughout (no KD in SFT, no hidden-state loss) is not drawn.
    out.retain(|s| s.points.iter().any(|p| p.1 != 0.0));
    Ok(out)
}

struct Canvas {
    pixels: Vec<u8>,
    height: usize,
}

impl Canvas {
    fn set(&mut self, x: i64, y: i64, c: [u8; 3]) {
        if x >= 0 && y >= 0 && (x as usize) < WIDTH && (y as usize) < self.height {
            let i = (y as usize * WIDTH + x as usize) * 3;
            self.pixels[i..i + 3].copy_from_slice(&c);
        }
    }

    /// Bresenham, two pixels thick.
    fn line(&mut self, (x0, y0): (i64, i64), (x1, y1): (i64, i64), c: [u8; 3], thick: bool) {
        let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
        let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
        let (mut x, mut y, mut err) = (x0, y0, dx + dy);
        loop {
            self.set(x, y, c);
            if thick {
                self.set(x, y + 1, c);
            }
            if x == x1 && y == y1 {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x += sx;
            }
            if e2 <= dx {
                err += dx;
                y += sy;
            }
        }
    }

    /// ASCII text with its top-left corner at (x, y), each font pixel `scale` pixels wide.
    fn text(&mut self, x: i64, y: i64, s: &str, scale: i64, c: [u8; 3]) {
        for (i, ch) in s.chars().enumerate() {
            let glyph = font8x8::legacy::BASIC_LEGACY[(ch as usize).min(127)];
            for (row, bits) in glyph.iter().enumerate() {
                for col in 0..8 {
                    if bits >> col & 1 == 1 {
                        for (py, px) in (0..scale).flat_map(|a| (0..scale).map(move |b| (a, b))) {
                            self.set(x + (i as i64 * 8 + col) * scale + px, y + row as i64 * scale + py, c);
                        }
                    }
                }
            }
        }
    }
}

/// Five to ten round tick values (1, 2 or 5 times a power of ten) covering [lo, hi].
fn ticks(lo: f64, hi: f64) -> (Vec<f64>, usize) {
    let raw = (hi - lo).max(1e-12) / 8.0;
    let magnitude = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0].iter().map(|m| m * magnitude).find(|s| *s >= raw).unwrap_or(10.0 * magnitude);
    let decimals = (-step.log10().floor()).max(0.0) as usize;
    let first = (lo / step).ceil() as i64;
    let last = (hi / step).floor() as i64;
    ((first..=last).map(|i| i as f64 * step).collect(), decimals)
}

/// Writes the panels as a PNG at `path` (atomically: temp file + rename).
pub fn write_loss_plot(series: &[Series], title: &str, path: &Path) -> Result<()> {
    let height = TOP + series.len().max(1) * PANEL_HEIGHT + BOTTOM;
    let mut canvas = Canvas { pixels: BACKGROUND.repeat(WIDTH * height), height };
    canvas.text(LEFT as i64, 10, title, 2, INK);
    let steps = series.iter().flat_map(|s| s.points.iter().map(|p| p.0));
    let (x_lo, x_hi) = steps.fold((f64::MAX, f64::MIN), |(a, b), x| (a.min(x), b.max(x)));
    let (x_lo, x_hi) = if x_lo < x_hi { (x_lo, x_hi) } else { (x_lo.min(0.0), x_lo.max(0.0) + 1.0) };
    let plot_w = (WIDTH - LEFT - RIGHT) as f64;
    let px = |x: f64| LEFT as i64 + ((x - x_lo) / (x_hi - x_lo) * plot_w).round() as i64;
    for (i, s) in series.iter().enumerate() {
        let top = TOP + i * PANEL_HEIGHT + 8;
        let bottom = top + PANEL_HEIGHT - 26;
        let (lo, hi) = s.points.iter().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
        let pad = ((hi - lo) * 0.05).max(hi.abs() * 1e-3).max(1e-9);
        let (lo, hi) = (lo - pad, hi + pad);
        let py = |y: f64| bottom as i64 - ((y - lo) / (hi - lo) * (bottom - top) as f64).round() as i64;
        let (values, decimals) = ticks(lo, hi);
        for v in values {
            let y = py(v);
            canvas.line((LEFT as i64, y), ((WIDTH - RIGHT) as i64, y), GRID, false);
            let label = format!("{v:.decimals$}");
            canvas.text(LEFT as i64 - 6 - 8 * label.len() as i64, y - 4, &label, 1, INK);
        }
        canvas.line((LEFT as i64, top as i64), (LEFT as i64, bottom as i64), INK, false);
        canvas.line((LEFT as i64, bottom as i64), ((WIDTH - RIGHT) as i64, bottom as i64), INK, false);
        let color = COLORS[i % COLORS.len()];
        // Top right: loss curves fall, so that corner is usually free.
        canvas.text((WIDTH - RIGHT) as i64 - 16 * s.name.len() as i64 - 8, top as i64 + 4, &s.name, 2, color);
        for w in s.points.windows(2) {
            canvas.line((px(w[0].0), py(w[0].1)), (px(w[1].0), py(w[1].1)), color, true);
        }
        if let [only] = s.points.as_slice() {
            canvas.line((px(only.0) - 2, py(only.1)), (px(only.0) + 2, py(only.1)), color, true);
        }
    }
    let axis_y = (TOP + series.len().max(1) * PANEL_HEIGHT - 18) as i64;
    let (values, decimals) = ticks(x_lo, x_hi);
    for v in values {
        let label = format!("{v:.decimals$}");
        canvas.line((px(v), axis_y), (px(v), axis_y + 4), INK, false);
        canvas.text(px(v) - 4 * label.len() as i64, axis_y + 8, &label, 1, INK);
    }
    canvas.text((WIDTH / 2) as i64 - 16, height as i64 - 16, "step", 1, INK);
    let tmp = path.with_extension("png.tmp");
    let file = std::fs::File::create(&tmp).with_context(|| format!("cannot write {}", tmp.display()))?;
    let mut encoder = png::Encoder::new(std::io::BufWriter::new(file), WIDTH as u32, height as u32);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header()?;
    writer.write_image_data(&canvas.pixels)?;
    writer.finish()?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_and_cover_the_range() {
        let labels = |(t, d): (Vec<f64>, usize)| t.iter().map(|v| format!("{v:.d$}")).collect::<Vec<_>>().join(" ");
        assert_eq!(labels(ticks(0.37, 1.92)), "0.4 0.6 0.8 1.0 1.2 1.4 1.6 1.8");
        assert_eq!(labels(ticks(1.0, 300.0)), "50 100 150 200 250 300");
        assert_eq!(labels(ticks(0.0123, 0.0161)), "0.0125 0.0130 0.0135 0.0140 0.0145 0.0150 0.0155 0.0160");
    }

    #[test]
    fn the_plot_is_a_png_with_one_panel_per_part() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = dir.path().join("metrics.jsonl");
        let lines: Vec<String> = (1..=30)
            .map(|s| {
                format!(r#"{{"step":{s},"loss":{},"kd":{},"ce":3.0,"hidden":0.0}}"#, 2.0 / s as f64, 1.0 / s as f64)
            })
            .collect();
        std::fs::write(&metrics, lines.join("\n")).unwrap();
        let series = series_from_metrics(&metrics).unwrap();
        assert_eq!(series.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(), ["loss", "kd", "ce"]);
        let png_path = dir.path().join("loss.png");
        write_loss_plot(&series, "test", &png_path).unwrap();
        let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&png_path).unwrap()));
        let mut reader = decoder.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!((info.width as usize, info.height as usize), (WIDTH, TOP + 3 * PANEL_HEIGHT + BOTTOM));
        // Each series' colour is on the canvas.
        for c in &COLORS[..3] {
            assert!(buf.chunks(3).any(|p| p == c), "colour {c:?} missing");
        }
    }
}
