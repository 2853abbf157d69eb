//! Landmark files: ANTs' CSV (a header line naming `x,y,z[,t,label,...]`, LPS mm, as
//! `antsApplyTransformsToPoints` reads them) and Slicer's markups `.fcsv` (RAS unless its
//! `# CoordinateSystem` line says LPS). Writing puts new coordinates into the lines as read:
//! every other column and line stays as it was.

use std::path::Path;

use super::atomic::write_atomic;
use super::IoError;

/// How a point file is laid out, told by extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PointsFormat {
    Csv,
    Fcsv,
}

impl PointsFormat {
    pub fn of(path: &Path) -> Result<Self, IoError> {
        let name = path.to_string_lossy().to_ascii_lowercase();
        if name.ends_with(".fcsv") {
            Ok(Self::Fcsv)
        } else if name.ends_with(".csv") {
            Ok(Self::Csv)
        } else {
            Err(IoError::new(path, "unknown point file type; expected .csv (ANTs, LPS) or .fcsv (Slicer)"))
        }
    }
}

#[derive(Debug, Clone)]
enum Line {
    Verbatim(String),
    /// The fields of a point's line, as written (quotes kept).
    Point(Vec<String>),
}

/// Points read from a file, in LPS mm, with what is needed to write them back alike.
#[derive(Debug, Clone)]
pub struct PointSet {
    pub format: PointsFormat,
    pub points: Vec<[f64; 3]>,
    lines: Vec<Line>,
    /// Columns of x, y and (where present) z.
    columns: [Option<usize>; 3],
    ras: bool,
}

/// Splits a CSV line at the commas outside double quotes, keeping every field's text as is.
fn split_fields(line: &str) -> Vec<String> {
    let (mut out, mut cur, mut quoted) = (Vec::new(), String::new(), false);
    for ch in line.chars() {
        match ch {
            '"' => {
                quoted = !quoted;
                cur.push(ch);
            }
            ',' if !quoted => out.push(std::mem::take(&mut cur)),
            _ => cur.push(ch),
        }
    }
    out.push(cur);
    out
}

fn column_names(fields: &[String]) -> Vec<String> {
    fields.iter().map(|f| f.trim().trim_matches('"').trim().to_ascii_lowercase()).collect()
}

fn find_columns(path: &Path, names: &[String], what: &str) -> Result<[Option<usize>; 3], IoError> {
    let col = |n: &str| names.iter().position(|c| c == n);
    match (col("x"), col("y")) {
        (Some(x), Some(y)) => Ok([Some(x), Some(y), col("z")]),
        _ => Err(IoError::new(path, format!("the {what} names no x and y columns (found {})", names.join(",")))),
    }
}

impl PointSet {
    pub fn read(path: &Path) -> Result<Self, IoError> {
        let format = PointsFormat::of(path)?;
        let text = std::fs::read_to_string(path).map_err(|e| IoError::new(path, format!("cannot be read: {e}")))?;
        let (mut lines, mut points) = (Vec::new(), Vec::new());
        let mut columns = None;
        let mut ras = format == PointsFormat::Fcsv;
        for (no, line) in text.lines().enumerate().map(|(i, l)| (i + 1, l)) {
            let body = line.trim();
            let header = match format {
                PointsFormat::Csv => columns.is_none() && !body.is_empty(),
                PointsFormat::Fcsv => body.starts_with('#'),
            };
            if header {
                if format == PointsFormat::Csv {
                    columns = Some(find_columns(path, &column_names(&split_fields(body)), "header line")?);
                } else if let Some((key, value)) = body.trim_start_matches('#').split_once('=') {
                    match key.trim().to_ascii_lowercase().as_str() {
                        "coordinatesystem" => {
                            ras = match value.trim().to_ascii_uppercase().as_str() {
                                "RAS" | "0" => true,
                                "LPS" | "1" => false,
                                v => {
                                    return Err(IoError::new(
                                        path,
                                        format!("line {no}: unknown coordinate system {v:?} (RAS or LPS)"),
                                    ))
                                }
                            }
                        }
                        "columns" => {
                            let names = column_names(&split_fields(value));
                            columns = Some(find_columns(path, &names, "'# columns' line")?);
                        }
                        _ => {}
                    }
                }
                lines.push(Line::Verbatim(line.to_string()));
                continue;
            }
            if body.is_empty() {
                lines.push(Line::Verbatim(line.to_string()));
                continue;
            }
            // Slicer's files before the '# columns' line existed: id,x,y,z,...
            let cols = *columns.get_or_insert([Some(1), Some(2), Some(3)]);
            let fields = split_fields(line);
            let mut p = [0.0; 3];
            for (a, c) in cols.iter().enumerate() {
                let Some(c) = c else { continue };
                let raw = fields.get(*c).map(|f| f.trim().trim_matches('"')).unwrap_or("");
                p[a] = raw.parse::<f64>().ok().filter(|v| v.is_finite()).ok_or_else(|| {
                    IoError::new(path, format!("line {no}: coordinate {:?} is not a finite number", raw))
                })?;
            }
            if ras {
                p = [-p[0], -p[1], p[2]];
            }
            points.push(p);
            lines.push(Line::Point(fields));
        }
        if points.is_empty() {
            return Err(IoError::new(path, "holds no points"));
        }
        Ok(Self { format, points, lines, columns: columns.unwrap_or([Some(1), Some(2), Some(3)]), ras })
    }

    /// Writes the file as read with `points` (LPS mm, one per point read) in place of the
    /// coordinates, in the file's own coordinate system.
    pub fn write(&self, path: &Path, points: &[[f64; 3]]) -> Result<(), IoError> {
        if PointsFormat::of(path)? != self.format {
            return Err(IoError::new(path, "points are written in the format they were read (.csv or .fcsv)"));
        }
        assert_eq!(points.len(), self.points.len(), "one new position per point");
        let mut out = String::new();
        let mut next = points.iter();
        for line in &self.lines {
            match line {
                Line::Verbatim(s) => out.push_str(s),
                Line::Point(fields) => {
                    let p = next.next().expect("counted above");
                    let p = if self.ras { [-p[0], -p[1], p[2]] } else { *p };
                    let mut fields = fields.clone();
                    for (a, c) in self.columns.iter().enumerate() {
                        if let Some(c) = c {
                            // `{:?}` reads back to the same double
                            fields[*c] = format!("{:?}", p[a]);
                        }
                    }
                    out.push_str(&fields.join(","));
                }
            }
            out.push('\n');
        }
        write_atomic(path, |w| std::io::Write::write_all(w, out.as_bytes()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_and_fcsv_keep_their_other_columns_and_systems() {
        let dir = tempfile::tempdir().unwrap();
        let csv = dir.path().join("p.csv");
        std::fs::write(&csv, "x,y,z,t,label,comment\n1.5,-2,3,0,1,\"a, b\"\n\n4,5,6,0,2,c\n").unwrap();
        let p = PointSet::read(&csv).unwrap();
        assert_eq!(p.points, vec![[1.5, -2.0, 3.0], [4.0, 5.0, 6.0]]);
        let out = dir.path().join("q.csv");
        p.write(&out, &[[1.0, 2.0, 3.0], [0.25, 0.0, -1.0]]).unwrap();
        let text = std::fs::read_to_string(&out).unwrap();
        assert_eq!(text, "x,y,z,t,label,comment\n1.0,2.0,3.0,0,1,\"a, b\"\n\n0.25,0.0,-1.0,0,2,c\n");

        let fcsv = dir.path().join("p.fcsv");
        let head = "# Markups fiducial file version = 4.11\n# CoordinateSystem = RAS\n\
                    # columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID\n";
        std::fs::write(&fcsv, format!("{head}vtkMRMLMarkupsFiducialNode_0,10,20,30,0,0,0,1,1,1,0,F-1,,\n")).unwrap();
        let p = PointSet::read(&fcsv).unwrap();
        assert_eq!(p.points, vec![[-10.0, -20.0, 30.0]]);
        let out = dir.path().join("q.fcsv");
        p.write(&out, &[[-1.0, -2.0, 3.0]]).unwrap();
        let text = std::fs::read_to_string(&out).unwrap();
        assert_eq!(text, format!("{head}vtkMRMLMarkupsFiducialNode_0,1.0,2.0,3.0,0,0,0,1,1,1,0,F-1,,\n"));
        // LPS files stay LPS
        std::fs::write(&fcsv, "# CoordinateSystem = LPS\nF-1,1,2,3\n").unwrap();
        assert_eq!(PointSet::read(&fcsv).unwrap().points, vec![[1.0, 2.0, 3.0]]);
    }

    #[test]
    fn bad_point_files_are_named_and_explained() {
        let dir = tempfile::tempdir().unwrap();
        let cases: &[(&str, &str, &str)] = &[
            ("a.csv", "a,b\n1,2\n", "no x and y columns"),
            ("b.csv", "x,y,z\n1,zz,3\n", "line 2: coordinate \"zz\""),
            ("c.csv", "x,y,z\n", "holds no points"),
            ("d.fcsv", "# CoordinateSystem = XYZ\n", "unknown coordinate system"),
            ("e.fcsv", "F-1,1,2\n", "line 1: coordinate \"\""),
            ("f.txt", "x,y\n", "unknown point file type"),
        ];
        for (name, text, want) in cases {
            let p = dir.path().join(name);
            std::fs::write(&p, text).unwrap();
            let e = PointSet::read(&p).unwrap_err().to_string();
            assert!(e.starts_with(&p.display().to_string()) && e.contains(want), "{name}: {e}");
        }
    }
}
