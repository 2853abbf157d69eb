//! Pictures of registrations: deformed grids, Jacobian maps, checkerboards, label contours and
//! loss curves, drawn with plotters into RGB buffers. Text uses an embedded DejaVu font, so no
//! system fonts are needed.

use std::sync::Once;

use anyhow::{bail, Result};
use image::RgbImage;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::FontStyle;
use registration::method::LossRecord;
use registration::{DisplacementField, Grid, Labels, Space, Volume};

const FONT: &str = "sans-serif";

fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // the font is compiled in; a failure here is a build defect, not a user error
        let _ = plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular());
        let _ = plotters::style::register_font(FONT, FontStyle::Bold, dejavu::sans::bold());
    });
}

/// Which slice to draw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Axis {
    Axial,
    Coronal,
    Sagittal,
}

/// A slice: an axis and an index along it (`None`: the middle).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SliceSpec {
    pub axis: Axis,
    pub index: Option<usize>,
}

impl Default for SliceSpec {
    fn default() -> Self {
        Self { axis: Axis::Axial, index: None }
    }
}

impl std::str::FromStr for SliceSpec {
    type Err = String;

    /// `axial`, `coronal:40`, `sagittal:12`.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let (name, idx) = match s.split_once(':') {
            Some((n, i)) => (n, Some(i.parse::<usize>().map_err(|_| format!("bad slice index in '{s}'"))?)),
            None => (s, None),
        };
        let axis = match name {
            "axial" => Axis::Axial,
            "coronal" => Axis::Coronal,
            "sagittal" => Axis::Sagittal,
            _ => return Err(format!("slice must be axial, coronal or sagittal[:INDEX], got '{s}'")),
        };
        Ok(Self { axis, index: idx })
    }
}

/// The mapping between a slice of a grid and the pixels of a panel.
struct View {
    /// voxel axes shown as columns and rows, and the fixed axis
    col: usize,
    row: usize,
    fixed: usize,
    index: usize,
    n_col: usize,
    n_row: usize,
    /// panel pixel size and the image's placement in it
    px_per_col: f64,
    px_per_row: f64,
    off: (f64, f64),
}

impl View {
    fn new(grid: &Grid, spec: SliceSpec, size: (u32, u32)) -> Result<Self> {
        let shape = grid.shape();
        let (mut col, mut row, mut fixed) = match spec.axis {
            Axis::Axial => (0, 1, 2),
            Axis::Coronal => (0, 2, 1),
            Axis::Sagittal => (1, 2, 0),
        };
        if grid.is_2d() {
            (col, row, fixed) = (0, 1, 2);
        }
        let index = spec.index.unwrap_or(shape[fixed] / 2);
        if index >= shape[fixed] {
            bail!("slice index {index} is outside 0..{} along that axis", shape[fixed]);
        }
        let sp = grid.spacing();
        let (wmm, hmm) = (shape[col] as f64 * sp[col], shape[row] as f64 * sp[row]);
        let scale = (size.0 as f64 / wmm).min(size.1 as f64 / hmm);
        let (w, h) = (wmm * scale, hmm * scale);
        Ok(Self {
            col,
            row,
            fixed,
            index,
            n_col: shape[col],
            n_row: shape[row],
            px_per_col: sp[col] * scale,
            px_per_row: sp[row] * scale,
            off: ((size.0 as f64 - w) / 2.0, (size.1 as f64 - h) / 2.0),
        })
    }

    /// Panel pixel of the in-plane voxel position `(c, r)`; rows grow upwards.
    fn to_px(&self, c: f64, r: f64) -> (i32, i32) {
        let x = self.off.0 + (c + 0.5) * self.px_per_col;
        let y = self.off.1 + (self.n_row as f64 - 0.5 - r) * self.px_per_row;
        (x.round() as i32, y.round() as i32)
    }

    /// Voxel index under a panel pixel, if any.
    fn voxel_at(&self, x: u32, y: u32, shape: [usize; 3]) -> Option<usize> {
        let c = ((x as f64 + 0.5 - self.off.0) / self.px_per_col).floor();
        let r = self.n_row as f64 - 1.0 - ((y as f64 + 0.5 - self.off.1) / self.px_per_row).floor();
        if c < 0.0 || r < 0.0 || c >= self.n_col as f64 || r >= self.n_row as f64 {
            return None;
        }
        let mut v = [0usize; 3];
        v[self.col] = c as usize;
        v[self.row] = r as usize;
        v[self.fixed] = self.index;
        Some((v[2] * shape[1] + v[1]) * shape[0] + v[0])
    }

    fn each_pixel(
        &self,
        area: &DrawingArea<BitMapBackend, Shift>,
        shape: [usize; 3],
        mut f: impl FnMut(usize) -> RGBColor,
    ) {
        let (w, h) = area.dim_in_pixel();
        for y in 0..h {
            for x in 0..w {
                if let Some(v) = self.voxel_at(x, y, shape) {
                    let _ = area.draw_pixel((x as i32, y as i32), &f(v));
                }
            }
        }
    }
}

/// Intensity window: 1st–99th percentile of a channel.
fn window(v: &Volume) -> (f32, f32) {
    let mut s: Vec<f32> = v.channel(0).iter().copied().filter(|x| x.is_finite()).collect();
    if s.is_empty() {
        return (0.0, 1.0);
    }
    let n = s.len();
    let lo = *s.select_nth_unstable_by(n / 100, f32::total_cmp).1;
    let hi = *s.select_nth_unstable_by(n - 1 - n / 100, f32::total_cmp).1;
    if hi > lo {
        (lo, hi)
    } else {
        (lo, lo + 1.0)
    }
}

fn grey(v: f32, (lo, hi): (f32, f32)) -> RGBColor {
    let g = (((v - lo) / (hi - lo)).clamp(0.0, 1.0) * 255.0) as u8;
    RGBColor(g, g, g)
}

fn label_colour(l: u32) -> RGBColor {
    const P: [RGBColor; 10] = [
        RGBColor(230, 25, 75),
        RGBColor(60, 180, 75),
        RGBColor(255, 225, 25),
        RGBColor(0, 130, 200),
        RGBColor(245, 130, 48),
        RGBColor(145, 30, 180),
        RGBColor(70, 240, 240),
        RGBColor(240, 50, 230),
        RGBColor(210, 245, 60),
        RGBColor(250, 190, 212),
    ];
    P[(l as usize + 9) % P.len()]
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, Shift>;

fn title(area: &Area, text: &str) {
    let style = (FONT, 15).into_font().color(&WHITE);
    // a dark backdrop: white text must stay readable over a light panel (the Jacobian map)
    let (w, _) = area.estimate_text_size(text, &style).unwrap_or((8 * text.len() as u32, 15));
    let _ = area.draw(&Rectangle::new([(2, 2), (w as i32 + 10, 22)], RGBColor(20, 20, 20).filled()));
    let _ = area.draw(&Text::new(text.to_string(), (6, 4), style));
}

/// Grey image of a slice.
fn draw_image(area: &Area, view: &View, img: &Volume, win: (f32, f32)) {
    let data = img.channel(0);
    view.each_pixel(area, img.grid.shape(), |v| grey(data[v], win));
}

/// Label boundaries (in-plane 4-neighbourhood) drawn in each label's colour.
fn draw_contours(area: &Area, view: &View, labels: &Labels) {
    let shape = labels.grid.shape();
    let (w, h) = area.dim_in_pixel();
    let at = |x: i64, y: i64| -> Option<u32> {
        if x < 0 || y < 0 || x >= w as i64 || y >= h as i64 {
            return None;
        }
        view.voxel_at(x as u32, y as u32, shape).map(|v| labels.data[v])
    };
    for y in 0..h as i64 {
        for x in 0..w as i64 {
            let Some(l) = at(x, y) else { continue };
            if l == 0 {
                continue;
            }
            let edge = [(1, 0), (-1, 0), (0, 1), (0, -1)].iter().any(|(dx, dy)| at(x + dx, y + dy) != Some(l));
            if edge {
                let _ = area.draw_pixel((x as i32, y as i32), &label_colour(l));
            }
        }
    }
}

/// The deformed grid: lines of the fixed grid every `step` voxels, each point moved by the
/// in-plane part of its displacement (where the moving image is sampled).
fn draw_grid(area: &Area, view: &View, field: &DisplacementField, step: usize) {
    let g = &field.grid;
    let shape = g.shape();
    let to_vox = g.matrix(Space::Lps, Space::Voxel);
    let disp_vox = |v: usize| -> [f64; 3] {
        let u = field.at(v);
        let mut d = [0.0; 3];
        for (r, dr) in d.iter_mut().enumerate() {
            *dr = (0..3).map(|c| to_vox[(r, c)] * u[c] as f64).sum();
        }
        d
    };
    let idx = |c: usize, r: usize| {
        let mut p = [0usize; 3];
        p[view.col] = c;
        p[view.row] = r;
        p[view.fixed] = view.index;
        (p[2] * shape[1] + p[1]) * shape[0] + p[0]
    };
    let style = RGBColor(255, 220, 0).stroke_width(1);
    let pt = |c: usize, r: usize| {
        let d = disp_vox(idx(c, r));
        view.to_px(c as f64 + d[view.col], r as f64 + d[view.row])
    };
    let step = step.max(1);
    for c in (0..view.n_col).step_by(step) {
        let line: Vec<(i32, i32)> = (0..view.n_row).map(|r| pt(c, r)).collect();
        let _ = area.draw(&PathElement::new(line, style));
    }
    for r in (0..view.n_row).step_by(step) {
        let line: Vec<(i32, i32)> = (0..view.n_col).map(|c| pt(c, r)).collect();
        let _ = area.draw(&PathElement::new(line, style));
    }
}

/// Diverging colour for a Jacobian determinant: blue (shrink) – white (1) – red (grow) on a log2
/// scale clipped at ×½ and ×2; folding (≤ 0) is black.
pub fn jacobian_colour(det: f32) -> RGBColor {
    if det <= 0.0 || !det.is_finite() {
        return RGBColor(0, 0, 0);
    }
    let t = det.log2().clamp(-1.0, 1.0);
    if t < 0.0 {
        let a = 1.0 + t; // 0 at ×½ … 1 at 1
        RGBColor((40.0 + 215.0 * a) as u8, (70.0 + 185.0 * a) as u8, 255)
    } else {
        let a = 1.0 - t;
        RGBColor(255, (60.0 + 195.0 * a) as u8, (50.0 + 205.0 * a) as u8)
    }
}

fn draw_jacobian(area: &Area, view: &View, jac: &Volume) {
    let d = jac.channel(0);
    view.each_pixel(area, jac.grid.shape(), |v| jacobian_colour(d[v]));
}

/// A vertical colour bar with labelled ticks at ×½, 1, ×2 and the folding swatch.
fn draw_colour_bar(area: &Area) {
    let (w, h) = area.dim_in_pixel();
    let (x0, x1) = (w as i32 - 70, w as i32 - 52);
    let (y0, y1) = (30, h as i32 - 60);
    for y in y0..=y1 {
        let t = 1.0 - 2.0 * (y - y0) as f32 / (y1 - y0) as f32; // +1 top, −1 bottom
        let c = jacobian_colour(2f32.powf(t));
        // one pixel row each: a rectangle needs a height of 1, [(x0, y), (x1, y)] draws nothing
        let _ = area.draw(&Rectangle::new([(x0, y), (x1, y + 1)], c.filled()));
    }
    let font = (FONT, 13).into_font().color(&WHITE);
    for (t, label) in [(1.0f32, "≥2"), (0.0, "1"), (-1.0, "≤½")] {
        let y = y0 + ((1.0 - t) / 2.0 * (y1 - y0) as f32) as i32;
        let _ = area.draw(&PathElement::new(vec![(x1, y), (x1 + 4, y)], WHITE));
        let _ = area.draw(&Text::new(label.to_string(), (x1 + 6, y - 7), font.clone()));
    }
    let _ = area.draw(&Rectangle::new([(x0, y1 + 14), (x1, y1 + 28)], BLACK.filled()));
    let _ = area.draw(&Rectangle::new([(x0, y1 + 14), (x1, y1 + 28)], WHITE));
    let _ = area.draw(&Text::new("≤0 fold".to_string(), (x0 - 8, y1 + 32), font));
    let _ = area.draw(&Text::new("det J".to_string(), (x0 - 6, 12), (FONT, 13).into_font().color(&WHITE)));
}

fn draw_checkerboard(area: &Area, view: &View, a: &Volume, b: &Volume, tile_px: u32) {
    let (wa, wb) = (window(a), window(b));
    let (da, db) = (a.channel(0), b.channel(0));
    let shape = a.grid.shape();
    let (w, h) = area.dim_in_pixel();
    for y in 0..h {
        for x in 0..w {
            if let Some(v) = view.voxel_at(x, y, shape) {
                let c =
                    if ((x / tile_px) + (y / tile_px)).is_multiple_of(2) { grey(da[v], wa) } else { grey(db[v], wb) };
                let _ = area.draw_pixel((x as i32, y as i32), &c);
            }
        }
    }
}

fn draw_losses(area: &Area, losses: &[LossRecord]) -> Result<()> {
    if losses.is_empty() {
        return Ok(());
    }
    let ys: Vec<f64> = losses.iter().map(|l| l.loss).collect();
    let (lo, hi) = ys.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &y| (a.min(y), b.max(y)));
    let pad = ((hi - lo) * 0.05).max(1e-6);
    let mut chart = ChartBuilder::on(area)
        .caption("loss per iteration", (FONT, 15).into_font().color(&WHITE))
        .margin(10)
        .x_label_area_size(28)
        .y_label_area_size(52)
        .build_cartesian_2d(0..losses.len(), (lo - pad)..(hi + pad))
        .map_err(|e| anyhow::anyhow!("drawing the loss curve: {e}"))?;
    chart
        .configure_mesh()
        .axis_style(WHITE)
        .bold_line_style(RGBColor(70, 70, 70))
        .light_line_style(RGBColor(40, 40, 40))
        .label_style((FONT, 12).into_font().color(&WHITE))
        .x_desc("iteration (all stages)")
        .draw()
        .map_err(|e| anyhow::anyhow!("drawing the loss axes: {e}"))?;
    // one colour per stage, so level switches are visible
    let mut start = 0;
    let mut stage = 0;
    while start < losses.len() {
        let name = losses[start].stage;
        let end = losses[start..].iter().position(|l| l.stage != name).map_or(losses.len(), |p| start + p);
        let colour = label_colour(stage as u32 + 1);
        chart
            .draw_series(LineSeries::new((start..end).map(|i| (i, ys[i])), colour.stroke_width(2)))
            .map_err(|e| anyhow::anyhow!("drawing the loss curve: {e}"))?
            .label(name.to_string())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 14, y)], colour.stroke_width(2)));
        start = end;
        stage += 1;
    }
    chart
        .configure_series_labels()
        .label_font((FONT, 12).into_font().color(&WHITE))
        .background_style(RGBColor(20, 20, 20))
        .border_style(WHITE)
        .draw()
        .map_err(|e| anyhow::anyhow!("drawing the legend: {e}"))?;
    Ok(())
}

fn canvas(w: u32, h: u32, draw: impl FnOnce(&Area) -> Result<()>) -> Result<RgbImage> {
    register_font();
    let mut buf = vec![0u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        root.fill(&RGBColor(12, 12, 12)).map_err(|e| anyhow::anyhow!("drawing: {e}"))?;
        draw(&root)?;
        root.present().map_err(|e| anyhow::anyhow!("drawing: {e}"))?;
    }
    RgbImage::from_raw(w, h, buf).ok_or_else(|| anyhow::anyhow!("picture buffer has the wrong size"))
}

const PANEL: (u32, u32) = (400, 400);

/// The deformed grid drawn over an image (or over black), `step` voxels between lines.
pub fn grid_picture(
    image: Option<&Volume>,
    field: &DisplacementField,
    spec: SliceSpec,
    step: usize,
) -> Result<RgbImage> {
    if let Some(img) = image {
        if !img.grid.same_as(&field.grid, 1e-3) {
            bail!("the image does not lie on the field's grid");
        }
    }
    canvas(PANEL.0, PANEL.1, |area| {
        let view = View::new(&field.grid, spec, PANEL)?;
        if let Some(img) = image {
            draw_image(area, &view, img, window(img));
        }
        draw_grid(area, &view, field, step);
        title(area, "deformed grid");
        Ok(())
    })
}

/// The Jacobian determinant of a field as a colour map with a labelled colour bar.
pub fn jacobian_picture(jac: &Volume, spec: SliceSpec) -> Result<RgbImage> {
    canvas(PANEL.0 + 90, PANEL.1, |area| {
        let (left, right) = area.split_horizontally(PANEL.0);
        let view = View::new(&jac.grid, spec, PANEL)?;
        draw_jacobian(&left, &view, jac);
        title(&left, "Jacobian determinant");
        draw_colour_bar(&right);
        Ok(())
    })
}

/// Axial, coronal and sagittal slices through the middle of an image (or `index` along each
/// axis), with label contours when given: a quick look at a subject.
pub fn overview_picture(image: &Volume, labels: Option<&Labels>, heading: &str) -> Result<RgbImage> {
    if let Some(l) = labels {
        if !l.grid.same_as(&image.grid, 1e-3) {
            bail!("the label map does not lie on the image's grid");
        }
    }
    let axes: &[Axis] = if image.grid.is_2d() { &[Axis::Axial] } else { &[Axis::Axial, Axis::Coronal, Axis::Sagittal] };
    let (pw, ph, head) = (360u32, 360u32, 30u32);
    canvas(pw * axes.len() as u32, ph + head, |root| {
        let _ = root.draw(&Text::new(heading.to_string(), (10, 6), (FONT, 17).into_font().color(&WHITE)));
        let body = root.margin(head as i32, 0, 0, 0);
        let panels = body.split_evenly((1, axes.len()));
        let win = window(image);
        for (area, &axis) in panels.iter().zip(axes) {
            let view = View::new(&image.grid, SliceSpec { axis, index: None }, (pw, ph))?;
            draw_image(area, &view, image, win);
            if let Some(l) = labels {
                draw_contours(area, &view, l);
            }
            title(area, &format!("{axis:?}").to_lowercase());
        }
        Ok(())
    })
}

/// What the summary sheet shows; all volumes on the fixed grid.
pub struct Summary<'a> {
    pub fixed: &'a Volume,
    /// The moving image resampled onto the fixed grid without deformation (world alignment only).
    pub moving_before: &'a Volume,
    pub warped: &'a Volume,
    pub fixed_labels: Option<&'a Labels>,
    pub moving_labels_before: Option<&'a Labels>,
    pub warped_labels: Option<&'a Labels>,
    pub field: &'a DisplacementField,
    pub jacobian: &'a Volume,
    pub losses: &'a [LossRecord],
    pub heading: String,
}

/// A 3×2 sheet: fixed, moving before, warped (with label contours), checkerboard, deformed grid,
/// Jacobian map with colour bar, and the loss curve.
pub fn summary_sheet(s: &Summary, spec: SliceSpec) -> Result<RgbImage> {
    let (pw, ph) = (360u32, 360u32);
    let head = 34;
    let (w, h) = (pw * 4, ph * 2 + head);
    canvas(w, h, |root| {
        let _ = root.draw(&Text::new(s.heading.clone(), (10, 8), (FONT, 18).into_font().color(&WHITE)));
        let body = root.margin(head as i32, 0, 0, 0);
        let (top, bottom) = body.split_vertically(ph);
        let mut panels = top.split_evenly((1, 4));
        let (b0, rest) = bottom.split_horizontally(pw);
        let (b1, wide) = rest.split_horizontally(pw);
        panels.push(b0);
        panels.push(b1);
        let view = View::new(&s.fixed.grid, spec, (pw, ph))?;
        let win = window(s.fixed);
        draw_image(&panels[0], &view, s.fixed, win);
        if let Some(l) = s.fixed_labels {
            draw_contours(&panels[0], &view, l);
        }
        title(&panels[0], "fixed");
        draw_image(&panels[1], &view, s.moving_before, window(s.moving_before));
        if let Some(l) = s.moving_labels_before {
            draw_contours(&panels[1], &view, l);
        }
        title(&panels[1], "moving (before)");
        draw_image(&panels[2], &view, s.warped, window(s.warped));
        if let Some(l) = s.warped_labels {
            draw_contours(&panels[2], &view, l);
        }
        title(&panels[2], "warped (after)");
        draw_checkerboard(&panels[3], &view, s.fixed, s.warped, 40);
        title(&panels[3], "checkerboard fixed / warped");
        draw_image(&panels[4], &view, s.warped, window(s.warped));
        draw_grid(&panels[4], &view, s.field, (s.fixed.grid.shape()[view.col] / 24).max(2));
        title(&panels[4], "deformed grid");
        let (jl, jr) = panels[5].split_horizontally(pw - 80);
        let jview = View::new(&s.jacobian.grid, spec, (pw - 80, ph))?;
        draw_jacobian(&jl, &jview, s.jacobian);
        title(&jl, "Jacobian determinant");
        draw_colour_bar(&jr);
        draw_losses(&wide, s.losses)?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use registration::Grid;

    use super::*;

    /// The colour bar is drawn: its column runs from red (top) through white to blue (bottom).
    #[test]
    fn jacobian_picture_has_a_colour_bar() {
        let grid = Grid::from_spacing([8, 8, 8], [1.0; 3], [0.0; 3]).unwrap();
        let jac = Volume::new(grid, 1, vec![1.0; 512]).unwrap();
        let img = jacobian_picture(&jac, SliceSpec { axis: Axis::Axial, index: None }).unwrap();
        let x = PANEL.0 + 90 - 61; // the middle of the bar (x0 = width − 70, x1 = width − 52)
        let (top, bottom) = (img.get_pixel(x, 32).0, img.get_pixel(x, PANEL.1 - 62).0);
        assert!(top[0] > 200 && top[2] < 120, "top of the bar {top:?}");
        assert!(bottom[2] > 200 && bottom[0] < 120, "bottom of the bar {bottom:?}");
    }
}
