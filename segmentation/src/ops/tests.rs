use candle_core::{DType, Device, Tensor, Var};

use super::*;

/// Deterministic pseudo-random numbers in [-1, 1) (tests must not depend on a global RNG).
fn rand_vec(n: usize, seed: u64) -> Vec<f64> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 11) as f64 / (1u64 << 52) as f64 - 1.0
        })
        .collect()
}

fn t(v: Vec<f64>, shape: &[usize]) -> Tensor {
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// Central-difference check of d(sum(f(x) · r))/dx against candle's backward, in f64.
fn check_grad(x: &Tensor, f: &dyn Fn(&Tensor) -> Tensor, tol: f64) {
    let var = Var::from_tensor(x).unwrap();
    let y = f(var.as_tensor());
    let r = t(rand_vec(y.elem_count(), 99), y.dims());
    let loss = (y * &r).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    let g: Vec<f64> =
        grads.get(var.as_tensor()).expect("gradient reaches the input").flatten_all().unwrap().to_vec1().unwrap();
    let x0: Vec<f64> = x.flatten_all().unwrap().to_vec1().unwrap();
    let eps = 1e-6;
    let eval = |v: Vec<f64>| -> f64 {
        let y = f(&t(v, x.dims()));
        (y * &r).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap()
    };
    let mut worst = 0.0f64;
    for i in 0..x0.len() {
        let mut p = x0.clone();
        p[i] += eps;
        let mut m = x0.clone();
        m[i] -= eps;
        let num = (eval(p) - eval(m)) / (2.0 * eps);
        worst = worst.max((num - g[i]).abs() / (1.0 + num.abs()));
    }
    assert!(worst < tol, "finite-difference mismatch {worst:e}");
}

fn volume(b: usize, c: usize, d: usize, h: usize, w: usize) -> Tensor {
    t(rand_vec(b * c * d * h * w, 7), &[b, c, d, h, w])
}

/// Points in normalised coordinates spread somewhat beyond the volume, so every padding branch runs.
fn points(b: usize, p: usize, spread: f64, seed: u64) -> Tensor {
    t(rand_vec(b * p * 3, seed).into_iter().map(|v| v * spread).collect(), &[b, p, 3])
}

#[test]
fn grid_sample_gradients_match_finite_differences() {
    let x = volume(2, 3, 4, 5, 6);
    for pad in [Padding::Zeros, Padding::Border, Padding::Extent] {
        let p = points(2, 40, 1.2, 3);
        let px = p.clone();
        check_grad(&x, &move |v| grid_sample(v, &px, Interpolation::Linear, pad).unwrap(), 1e-7);
        let xx = x.clone();
        check_grad(&p, &move |q| grid_sample(&xx, q, Interpolation::Linear, pad).unwrap(), 1e-6);
        let px = p.clone();
        check_grad(&x, &move |v| grid_sample(v, &px, Interpolation::Nearest, pad).unwrap(), 1e-7);
    }
}

#[test]
fn grid_sample_input_gradient_with_many_points_one_channel() {
    // exercises the split accumulation path (few volumes, many points)
    let x = volume(1, 1, 3, 4, 5);
    let p = points(1, 20000, 1.1, 5);
    let var = Var::from_tensor(&x).unwrap();
    let y = grid_sample(var.as_tensor(), &p, Interpolation::Linear, Padding::Zeros).unwrap();
    let g = y.sum_all().unwrap().backward().unwrap();
    let gi: Vec<f64> = g.get(var.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    // d(sum)/d(voxel) = sum of that voxel's interpolation weights over all points
    let pts: Vec<f64> = p.flatten_all().unwrap().to_vec1().unwrap();
    let mut expect = vec![0.0; 60];
    for q in pts.chunks(3) {
        for (idx, e) in expect.iter_mut().enumerate() {
            let mut one = vec![0.0; 60];
            one[idx] = 1.0;
            let dims = Dims { d: 3, h: 4, w: 5 };
            let v = [(q[0] + 1.0) * 2.0, (q[1] + 1.0) * 1.5, (q[2] + 1.0) * 1.0];
            *e += sample_point(&one, dims, v, Interpolation::Linear, Padding::Zeros);
        }
    }
    for (a, b) in gi.iter().zip(&expect) {
        assert!((a - b).abs() < 1e-9, "{a} vs {b}");
    }
}

#[test]
fn grid_sample_reproduces_voxels_and_linear_functions() {
    let (d, h, w) = (4, 5, 6);
    // f(i, j, k) = 2i - j + 3k + 1 is reproduced exactly by trilinear interpolation
    let mut data = vec![0.0; d * h * w];
    for k in 0..d {
        for j in 0..h {
            for i in 0..w {
                data[(k * h + j) * w + i] = 2.0 * i as f64 - j as f64 + 3.0 * k as f64 + 1.0;
            }
        }
    }
    let x = t(data.clone(), &[1, 1, d, h, w]);
    let vox = [[0.0, 0.0, 0.0], [5.0, 4.0, 3.0], [2.3, 1.7, 0.4], [4.9, 0.1, 2.5]];
    let norm: Vec<f64> = vox.iter().flat_map(|v| [v[0] / 2.5 - 1.0, v[1] / 2.0 - 1.0, v[2] / 1.5 - 1.0]).collect();
    let y: Vec<f64> = grid_sample(&x, &t(norm, &[1, 4, 3]), Interpolation::Linear, Padding::Zeros)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    for (v, got) in vox.iter().zip(&y) {
        let want = 2.0 * v[0] - v[1] + 3.0 * v[2] + 1.0;
        assert!((want - got).abs() < 1e-12, "{want} vs {got}");
    }
}

#[test]
fn padding_modes_outside_the_volume() {
    let dims = Dims { d: 1, h: 1, w: 4 };
    let v = [1.0f64, 2.0, 3.0, 4.0];
    let at = |x: f64, pad| sample_point(&v, dims, [x, 0.0, 0.0], Interpolation::Linear, pad);
    // beyond the last centre by a quarter voxel
    assert_eq!(at(3.25, Padding::Border), 4.0);
    assert_eq!(at(3.25, Padding::Extent), 4.0);
    assert!((at(3.25, Padding::Zeros) - 3.0).abs() < 1e-12);
    // beyond the physical extent
    assert_eq!(at(3.6, Padding::Extent), 0.0);
    assert_eq!(at(-0.6, Padding::Extent), 0.0);
    assert_eq!(at(-0.4, Padding::Extent), 1.0);
    assert_eq!(at(50.0, Padding::Border), 4.0);
    assert_eq!(at(f64::NAN, Padding::Border), 0.0);
    assert_eq!(at(1e30, Padding::Zeros), 0.0);
    // nearest rounds halves up, like ITK
    let nn = |x: f64, pad| sample_point(&v, dims, [x, 0.0, 0.0], Interpolation::Nearest, pad);
    assert_eq!(nn(1.5, Padding::Zeros), 3.0);
    assert_eq!(nn(1.49, Padding::Zeros), 2.0);
    assert_eq!(nn(3.7, Padding::Zeros), 0.0);
    assert_eq!(nn(3.7, Padding::Border), 4.0);
}

#[test]
fn f32_and_f64_agree() {
    let x = volume(1, 2, 5, 6, 7);
    let p = points(1, 100, 1.1, 11);
    let a: Vec<f64> =
        grid_sample(&x, &p, Interpolation::Linear, Padding::Border).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let b: Vec<f32> = grid_sample(
        &x.to_dtype(DType::F32).unwrap(),
        &p.to_dtype(DType::F32).unwrap(),
        Interpolation::Linear,
        Padding::Border,
    )
    .unwrap()
    .flatten_all()
    .unwrap()
    .to_vec1()
    .unwrap();
    for (a, b) in a.iter().zip(&b) {
        assert!((a - *b as f64).abs() < 1e-5);
    }
}

#[test]
fn axis_op_gradients_match_finite_differences() {
    let x = volume(1, 2, 5, 6, 7);
    check_grad(&x, &|v| avg_pool3d(v, [3, 3, 2], [1, 2, 2], [1, 1, 0]).unwrap(), 1e-7);
    check_grad(&x, &|v| resize_trilinear(v, [9, 3, 14]).unwrap(), 1e-7);
    check_grad(&x, &|v| resize_trilinear_aligned(v, [9, 3, 14]).unwrap(), 1e-7);
    check_grad(&x, &|v| bspline_smooth3d(v, [1.5, 2.0, 1.0]).unwrap(), 1e-7);
    check_grad(&x, &|v| resize(v, [3, 9, 4]).unwrap(), 1e-7);
    check_grad(&x, &|v| box_filter3d(v, [1, 2, 0]).unwrap(), 1e-7);
}

#[test]
fn box_filter_replicates_the_ends_and_keeps_constants() {
    let x = t(vec![1.0, 2.0, 4.0, 8.0], &[1, 1, 1, 1, 4]);
    let y: Vec<f64> = box_filter3d(&x, [0, 0, 1]).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let want = [(1.0 + 1.0 + 2.0) / 3.0, 7.0 / 3.0, 14.0 / 3.0, (4.0 + 8.0 + 8.0) / 3.0];
    for (a, b) in y.iter().zip(want) {
        assert!((a - b).abs() < 1e-12, "{y:?}");
    }
    let c = Tensor::full(2.5f64, (1, 2, 3, 4, 5), &Device::Cpu).unwrap();
    let m: Vec<f64> = box_filter3d(&c, [2, 2, 2]).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    assert!(m.iter().all(|v| (v - 2.5).abs() < 1e-12));
}

#[test]
fn area_resize_averages_and_keeps_constants() {
    let op = AxisOperator::resize_area(5, 2);
    let y: Vec<f64> = op.apply(&[1.0, 2.0, 3.0, 4.0, 5.0], 1, 1);
    // [0, 2.5) and [2.5, 5)
    assert!((y[0] - (1.0 + 2.0 + 0.5 * 3.0) / 2.5).abs() < 1e-12);
    assert!((y[1] - (0.5 * 3.0 + 4.0 + 5.0) / 2.5).abs() < 1e-12);
    let c: Vec<f64> = AxisOperator::resize_area(7, 3).apply(&[2.0; 7], 1, 1);
    assert!(c.iter().all(|v| (v - 2.0).abs() < 1e-12));
}

#[test]
fn avg_pool_matches_direct_average() {
    let x = volume(1, 1, 4, 4, 4);
    let y = avg_pool3d(&x, [2, 2, 2], [2, 2, 2], [0, 0, 0]).unwrap();
    assert_eq!(y.dims(), &[1, 1, 2, 2, 2]);
    let xv: Vec<f64> = x.flatten_all().unwrap().to_vec1().unwrap();
    let yv: Vec<f64> = y.flatten_all().unwrap().to_vec1().unwrap();
    let mut want = 0.0;
    for k in 0..2 {
        for j in 0..2 {
            for i in 0..2 {
                want += xv[(k * 4 + j) * 4 + i] / 8.0;
            }
        }
    }
    assert!((yv[0] - want).abs() < 1e-12);
    // with padding, zeros count towards the mean (count_include_pad)
    let ones = Tensor::ones((1, 1, 3, 3, 3), DType::F64, &Device::Cpu).unwrap();
    let p: Vec<f64> =
        avg_pool3d(&ones, [3, 3, 3], [1, 1, 1], [1, 1, 1]).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    assert!((p[0] - 8.0 / 27.0).abs() < 1e-12);
    assert!((p[13] - 1.0).abs() < 1e-12);
}

#[test]
fn resize_matches_pytorch_align_corners_false() {
    // torch.nn.functional.interpolate([0, 1, 2, 3], size=8, mode='linear', align_corners=False)
    let x = t(vec![0.0, 1.0, 2.0, 3.0], &[1, 1, 1, 1, 4]);
    let y: Vec<f64> = resize_trilinear(&x, [1, 1, 8]).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let want = [0.0, 0.25, 0.75, 1.25, 1.75, 2.25, 2.75, 3.0];
    for (a, b) in y.iter().zip(want) {
        assert!((a - b).abs() < 1e-12, "{y:?}");
    }
}

#[test]
fn bspline_smoothing_keeps_affine_fields() {
    let (d, h, w) = (6, 7, 8);
    let mut data = Vec::new();
    for c in 0..3 {
        for k in 0..d {
            for j in 0..h {
                for i in 0..w {
                    data.push(0.3 * i as f64 - 1.1 * j as f64 + (c as f64 + 0.5) * k as f64 + 2.0);
                }
            }
        }
    }
    let x = t(data, &[1, 3, d, h, w]);
    let y = bspline_smooth3d(&x, [2.0, 2.0, 2.0]).unwrap();
    let diff = (y - &x).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
    assert!(diff < 1e-9, "B-spline smoothing changed an affine field by {diff}");
    // and it does smooth a non-linear one
    let z = volume(1, 1, d, h, w);
    let s = bspline_smooth3d(&z, [2.0, 2.0, 2.0]).unwrap();
    let change = (s - &z).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
    assert!(change > 0.1);
}

#[test]
fn axis_operator_transpose_is_the_adjoint() {
    let op = AxisOperator::bspline_smooth(9, 2.5);
    let tr = op.transpose();
    let x = rand_vec(9, 1);
    let y = rand_vec(op.n_out(), 2);
    let ax = op.apply(&x, 1, 1);
    let aty = tr.apply(&y, 1, 1);
    let lhs: f64 = ax.iter().zip(&y).map(|(a, b)| a * b).sum();
    let rhs: f64 = x.iter().zip(&aty).map(|(a, b)| a * b).sum();
    assert!((lhs - rhs).abs() < 1e-12);
}

/// Direct-loop 3D cross-correlation, the reference for [`conv3d`].
#[allow(clippy::too_many_arguments)]
fn conv3d_direct(
    x: &[f64],
    xs: [usize; 5],
    w: &[f64],
    ws: [usize; 5],
    stride: [usize; 3],
    pad: [usize; 3],
    groups: usize,
) -> (Vec<f64>, [usize; 5]) {
    let [b, cin, d, h, wd] = xs;
    let [cout, cig, kd, kh, kw] = ws;
    let o = |n: usize, k: usize, a: usize| (n + 2 * pad[a] - k) / stride[a] + 1;
    let (od, oh, ow) = (o(d, kd, 0), o(h, kh, 1), o(wd, kw, 2));
    let mut y = vec![0.0; b * cout * od * oh * ow];
    let og = cout / groups;
    for bi in 0..b {
        for co in 0..cout {
            let g = co / og;
            for z in 0..od {
                for yy in 0..oh {
                    for xx in 0..ow {
                        let mut acc = 0.0;
                        for ci in 0..cig {
                            let cx = g * cig + ci;
                            for a in 0..kd {
                                for bb in 0..kh {
                                    for e in 0..kw {
                                        let sz = (z * stride[0] + a) as isize - pad[0] as isize;
                                        let sy = (yy * stride[1] + bb) as isize - pad[1] as isize;
                                        let sx = (xx * stride[2] + e) as isize - pad[2] as isize;
                                        if sz < 0 || sy < 0 || sx < 0 {
                                            continue;
                                        }
                                        let (sz, sy, sx) = (sz as usize, sy as usize, sx as usize);
                                        if sz >= d || sy >= h || sx >= wd {
                                            continue;
                                        }
                                        acc += x[(((bi * cin + cx) * d + sz) * h + sy) * wd + sx]
                                            * w[((((co * cig + ci) * kd + a) * kh + bb) * kw) + e];
                                    }
                                }
                            }
                        }
                        y[(((bi * cout + co) * od + z) * oh + yy) * ow + xx] = acc;
                    }
                }
            }
        }
    }
    (y, [b, cout, od, oh, ow])
}

#[test]
fn conv3d_matches_direct_loops() {
    type Case = ([usize; 5], [usize; 5], [usize; 3], [usize; 3], usize);
    let cases: [Case; 4] = [
        ([2, 3, 5, 6, 4], [4, 3, 3, 3, 3], [1, 1, 1], [1, 1, 1], 1),
        ([1, 4, 7, 5, 6], [6, 2, 3, 2, 3], [2, 1, 2], [1, 0, 1], 2),
        ([2, 4, 3, 3, 3], [8, 1, 1, 1, 1], [1, 1, 1], [0, 0, 0], 4),
        ([1, 2, 6, 6, 6], [3, 2, 2, 2, 2], [2, 2, 2], [0, 0, 0], 1),
    ];
    for (i, (xs, ws, stride, pad, groups)) in cases.into_iter().enumerate() {
        let xv = rand_vec(xs.iter().product(), 10 + i as u64);
        let wv = rand_vec(ws.iter().product(), 20 + i as u64);
        let (want, ys) = conv3d_direct(&xv, xs, &wv, ws, stride, pad, groups);
        let y = conv3d(&t(xv, &xs), &t(wv, &ws), stride, pad, groups).unwrap();
        assert_eq!(y.dims(), &ys, "case {i}");
        let got: Vec<f64> = y.flatten_all().unwrap().to_vec1().unwrap();
        for (a, b) in got.iter().zip(&want) {
            assert!((a - b).abs() < 1e-12, "case {i}: {a} vs {b}");
        }
    }
}

#[test]
fn conv3d_gradients_match_finite_differences() {
    for (xs, ws, stride, pad, groups) in [
        ([2, 2, 4, 3, 5], [3, 2, 3, 3, 3], [1, 1, 1], [1, 1, 1], 1),
        ([1, 4, 5, 4, 4], [4, 2, 3, 1, 2], [2, 1, 2], [1, 0, 1], 2),
    ] {
        let x = t(rand_vec(xs.iter().product(), 1), &xs);
        let w = t(rand_vec(ws.iter().product(), 2), &ws);
        let bias = t(rand_vec(ws[0], 3), &[1, ws[0], 1, 1, 1]);
        let (wc, bc) = (w.clone(), bias.clone());
        check_grad(&x, &move |v| conv3d(v, &wc, stride, pad, groups).unwrap().broadcast_add(&bc).unwrap(), 1e-7);
        let (xc, bc) = (x.clone(), bias.clone());
        check_grad(&w, &move |v| conv3d(&xc, v, stride, pad, groups).unwrap().broadcast_add(&bc).unwrap(), 1e-7);
        let (xc, wc) = (x.clone(), w.clone());
        check_grad(&bias, &move |v| conv3d(&xc, &wc, stride, pad, groups).unwrap().broadcast_add(v).unwrap(), 1e-7);
    }
}

#[test]
fn conv3d_rejects_bad_shapes() {
    let x = volume(1, 3, 4, 4, 4);
    assert!(conv3d(&x, &volume(4, 2, 3, 3, 3), [1; 3], [1; 3], 1).is_err());
    assert!(conv3d(&x, &volume(4, 1, 3, 3, 3), [1; 3], [1; 3], 2).is_err());
    assert!(conv3d(&x, &volume(4, 3, 7, 3, 3), [1; 3], [0; 3], 1).is_err());
}

#[test]
fn aligned_resize_agrees_with_grid_sampling() {
    // align_corners = true resizing = sampling the coarse volume at a regular [-1, 1] grid
    let x = volume(1, 2, 3, 4, 5);
    let size = [7, 4, 9];
    let y = resize_trilinear_aligned(&x, size).unwrap();
    let ax = |n: usize, i: usize| -1.0 + 2.0 * i as f64 / (n - 1) as f64;
    let mut pts = Vec::new();
    for k in 0..size[0] {
        for j in 0..size[1] {
            for i in 0..size[2] {
                pts.extend([ax(size[2], i), ax(size[1], j), ax(size[0], k)]);
            }
        }
    }
    let n = pts.len() / 3;
    let s = grid_sample(&x, &t(pts, &[1, n, 3]), Interpolation::Linear, Padding::Border).unwrap();
    let d = (y.flatten_from(2).unwrap() - s).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
    assert!(d < 1e-12, "{d}");
}

/// The kernel sampler against its definition built from `grid_sample` and tensor ops (the
/// OBELISK layer's former implementation), values and all three gradients by finite differences.
#[test]
fn kernel_sample_matches_grid_sample_composition_and_gradients() {
    let (b, c, p, s) = (2, 2, 3, 6);
    let x = volume(b, c, 4, 5, 6);
    let pts = points(b, p, 1.0, 11);
    let off = t(rand_vec(s * 3, 12).into_iter().map(|v| 0.4 * v).collect(), &[s, 3]);
    let aff = t(
        rand_vec(b * p * 9, 13)
            .iter()
            .enumerate()
            .map(|(i, v)| if i % 9 % 4 == 0 { 1.0 } else { 0.0 } + 0.2 * v)
            .collect(),
        &[b, p, 3, 3],
    );
    let reference = |x: &Tensor, pts: &Tensor, off: &Tensor, aff: Option<&Tensor>, binary: bool| {
        let o = match aff {
            Some(a) => {
                a.reshape((b * p * 3, 3)).unwrap().matmul(&off.t().unwrap()).unwrap().reshape((b, p, 3, s)).unwrap()
            }
            None => off.t().unwrap().reshape((1, 1, 3, s)).unwrap().broadcast_as((b, p, 3, s)).unwrap(),
        };
        let q = pts.unsqueeze(2).unwrap().broadcast_add(&o.transpose(2, 3).unwrap()).unwrap();
        let v = grid_sample(x, &q.reshape((b, p * s, 3)).unwrap(), Interpolation::Linear, Padding::Zeros).unwrap();
        let v = v.reshape((b, c, p, s)).unwrap();
        let k = if binary { s / 2 } else { s };
        let v = if binary { (v.narrow(3, 0, k).unwrap() - v.narrow(3, k, k).unwrap()).unwrap() } else { v };
        v.transpose(2, 3).unwrap().contiguous().unwrap().reshape((b, c * k, p)).unwrap()
    };
    for binary in [true, false] {
        for a in [None, Some(&aff)] {
            let got = kernel_sample(&x, &pts, &off, a, binary).unwrap();
            let want = reference(&x, &pts, &off, a, binary);
            assert_eq!(got.dims(), want.dims());
            let diff = (got - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
            assert!(diff < 1e-12, "binary {binary}, affine {}: {diff}", a.is_some());
            check_grad(&x, &|v| kernel_sample(v, &pts, &off, a, binary).unwrap(), 1e-6);
            check_grad(&pts, &|v| kernel_sample(&x, v, &off, a, binary).unwrap(), 1e-6);
            check_grad(&off, &|v| kernel_sample(&x, &pts, v, a, binary).unwrap(), 1e-6);
        }
    }
    assert!(kernel_sample(&x, &pts, &t(rand_vec(9, 1), &[3, 3]), None, true).is_err(), "odd S for binary");
    assert!(kernel_sample(&x, &points(1, p, 1.0, 2), &off, None, true).is_err(), "batch mismatch");
}

/// The grid fast path gives exactly the values of the general op at the grid's points, for any
/// run of them, with offsets that reach outside the volume (zero padding).
#[test]
fn kernel_sample_grid_equals_kernel_sample_on_the_grid() {
    let (b, c, s) = (2, 2, 6);
    let x = volume(b, c, 4, 5, 6);
    let off = t(rand_vec(s * 3, 21).into_iter().map(|v| 0.8 * v).collect(), &[s, 3]);
    let size = [3, 4, 5];
    let n: usize = size.iter().product();
    let grid = crate::obelisk::regular_grid(size, DType::F64, &Device::Cpu).unwrap();
    for binary in [true, false] {
        for (start, len) in [(0, n), (7, 23), (n - 1, 1)] {
            let pts = grid.narrow(0, start, len).unwrap().unsqueeze(0).unwrap().broadcast_as((b, len, 3)).unwrap();
            let want = kernel_sample(&x, &pts, &off, None, binary).unwrap();
            let got = kernel_sample_grid(&x, size, start, len, &off, binary).unwrap();
            assert_eq!(got.dims(), want.dims());
            let diff = (got - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
            assert_eq!(diff, 0.0, "binary {binary}, points {start}..{}", start + len);
        }
    }
    assert!(kernel_sample_grid(&x, size, n - 1, 2, &off, true).is_err(), "run past the grid");
}

/// The fused similarity equals grid sampling + overlap mask + masked L1 composed of candle ops,
/// in value and in its gradient, which matches finite differences; points outside the moving
/// extent count neither in the sum nor in the normalisation.
#[test]
fn sampled_l1_equals_the_composed_loss_and_its_gradient() {
    let (c, np) = (3, 300);
    let moving = volume(1, c, 5, 6, 7);
    let fixed = t(rand_vec(c * np, 11), &[1, c, np]);
    // spread 1.3: some points beyond the extent (|p| > 1 + 1/(n − 1)) on every axis
    let p = points(1, np, 1.3, 5);
    let l1 = SampledL1::new(&moving, &fixed).unwrap();
    let composed = |q: &Tensor| -> (Tensor, f64) {
        let lim = [7usize, 6, 5].map(|n| 1.0 + 1.0 / (n as f64 - 1.0));
        let qv: Vec<f64> = q.flatten_all().unwrap().to_vec1().unwrap();
        let mask: Vec<f64> =
            qv.chunks(3).map(|x| if (0..3).all(|a| x[a].abs() <= lim[a]) { 1.0 } else { 0.0 }).collect();
        let count: f64 = mask.iter().sum();
        let mask = t(mask, &[1, 1, np]);
        let m = grid_sample(&moving, q, Interpolation::Linear, Padding::Border).unwrap();
        let s = (&fixed - m).unwrap().abs().unwrap().broadcast_mul(&mask).unwrap().sum_all().unwrap();
        ((s / (c as f64 * count)).unwrap(), count / np as f64)
    };
    let (fused, inside) = l1.loss(&p).unwrap();
    let (want, want_inside) = composed(&p);
    assert!(want_inside > 0.3 && want_inside < 0.95, "the test needs points on both sides: {want_inside}");
    assert_eq!(inside, want_inside);
    let (a, b) = (fused.to_scalar::<f64>().unwrap(), want.to_scalar::<f64>().unwrap());
    assert!((a - b).abs() < 1e-12, "fused {a} vs composed {b}");

    let var = Var::from_tensor(&p).unwrap();
    let g_fused = l1.loss(var.as_tensor()).unwrap().0.backward().unwrap();
    let g_comp = composed(var.as_tensor()).0.backward().unwrap();
    let gf: Vec<f64> = g_fused.get(var.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let gc: Vec<f64> = g_comp.get(var.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let worst = gf.iter().zip(&gc).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max);
    assert!(worst < 1e-12, "gradients differ by {worst:e}");
    assert!(gf.iter().any(|&g| g != 0.0));
    let l1c = l1.clone();
    check_grad(&p, &move |q| l1c.loss(q).unwrap().0, 1e-6);

    // f32 maps give the same loss to f32 precision
    let l1_32 = SampledL1::new(&moving.to_dtype(DType::F32).unwrap(), &fixed.to_dtype(DType::F32).unwrap()).unwrap();
    let a32 = l1_32.loss(&p).unwrap().0.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap();
    assert!((a32 - a).abs() < 1e-5 * a.abs().max(1.0));
    assert!(SampledL1::new(&moving, &fixed.narrow(1, 0, 2).unwrap()).is_err());
    assert!(l1.loss(&p.narrow(1, 0, 10).unwrap()).is_err());
}

/// With masks the fused similarity equals the composed loss weighted per fixed point and
/// restricted to points whose nearest moving voxel is in the moving mask (normalised by the
/// weighted count), and its gradient matches finite differences.
#[test]
fn sampled_l1_with_masks_equals_the_weighted_composed_loss() {
    let (c, np) = (2, 300);
    let (d, h, w) = (5, 6, 7);
    let moving = volume(1, c, d, h, w);
    let fixed = t(rand_vec(c * np, 13), &[1, c, np]);
    let p = points(1, np, 1.1, 9);
    let weights: Vec<f64> = (0..np).map(|i| [0.0, 0.5, 1.0][i % 3]).collect();
    // the moving mask keeps the voxels with x < 4
    let mmask: Vec<bool> = (0..d * h * w).map(|v| v % w < 4).collect();
    let l1 = SampledL1::new(&moving, &fixed).unwrap().with_masks(Some(weights.clone()), Some(mmask.clone())).unwrap();
    let composed = |q: &Tensor| -> (Tensor, f64) {
        let lim = [w, h, d].map(|n| 1.0 + 1.0 / (n as f64 - 1.0));
        let qv: Vec<f64> = q.flatten_all().unwrap().to_vec1().unwrap();
        let mask: Vec<f64> = qv
            .chunks(3)
            .zip(&weights)
            .map(|(x, &wt)| {
                let inside = (0..3).all(|a| x[a].abs() <= lim[a]);
                let vx = ((x[0] + 1.0) * (w as f64 - 1.0) / 2.0).round().clamp(0.0, w as f64 - 1.0) as usize;
                if inside && vx < 4 {
                    wt
                } else {
                    0.0
                }
            })
            .collect();
        let count: f64 = mask.iter().sum();
        let mask = t(mask, &[1, 1, np]);
        let m = grid_sample(&moving, q, Interpolation::Linear, Padding::Border).unwrap();
        let s = (&fixed - m).unwrap().abs().unwrap().broadcast_mul(&mask).unwrap().sum_all().unwrap();
        ((s / (c as f64 * count)).unwrap(), count / np as f64)
    };
    let (fused, inside) = l1.loss(&p).unwrap();
    let (want, want_inside) = composed(&p);
    assert!(want_inside > 0.1 && want_inside < 0.6, "the masks must remove some points: {want_inside}");
    assert!((inside - want_inside).abs() < 1e-12);
    let (a, b) = (fused.to_scalar::<f64>().unwrap(), want.to_scalar::<f64>().unwrap());
    assert!((a - b).abs() < 1e-12, "fused {a} vs composed {b}");
    let l1c = l1.clone();
    check_grad(&p, &move |q| l1c.loss(q).unwrap().0, 1e-6);
    let unmasked = SampledL1::new(&moving, &fixed).unwrap();
    assert!((unmasked.loss(&p).unwrap().0.to_scalar::<f64>().unwrap() - a).abs() > 1e-6, "the masks change the loss");
    assert!(SampledL1::new(&moving, &fixed).unwrap().with_masks(Some(vec![1.0; 3]), None).is_err());
    assert!(SampledL1::new(&moving, &fixed).unwrap().with_masks(None, Some(vec![true; 3])).is_err());
}

/// The local NCC loss composed of candle ops (the registration's former implementation), the
/// reference for the fused op.
fn local_ncc_composed(fixed: &Tensor, warped: &Tensor, mask: &Tensor, r: [usize; 3]) -> Tensor {
    const EPS: f64 = 1e-5;
    let c = fixed.dim(1).unwrap();
    let mask = mask.detach();
    let count = (box_filter3d(&mask, r).unwrap() + EPS).unwrap();
    let mean = |x: &Tensor| box_filter3d(&x.broadcast_mul(&mask).unwrap(), r).unwrap().broadcast_div(&count).unwrap();
    let (mf, mw) = (mean(fixed), mean(warped));
    let cross = (mean(&(fixed * warped).unwrap()) - (&mf * &mw).unwrap()).unwrap();
    let var_f = (mean(&fixed.sqr().unwrap()) - mf.sqr().unwrap()).unwrap().relu().unwrap();
    let var_w = (mean(&warped.sqr().unwrap()) - mw.sqr().unwrap()).unwrap().relu().unwrap();
    let cc = (cross.sqr().unwrap() / ((var_f * var_w).unwrap() + EPS * EPS).unwrap()).unwrap();
    let weight = mask.sum_all().unwrap().to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap() * c as f64;
    let mean_cc = (cc.broadcast_mul(&mask).unwrap().sum_all().unwrap() / weight.max(1.0)).unwrap();
    mean_cc.affine(-1.0, 1.0).unwrap()
}

/// A smooth random texture `(1, c, d, h, w)` plus some noise, and a mask with soft weights,
/// holes and a zero border region.
fn ncc_inputs(c: usize, d: usize, h: usize, w: usize, seed: u64) -> (Tensor, Tensor, Tensor) {
    let n = d * h * w;
    let noise = rand_vec(2 * c * n + n, seed);
    let tex = |k: usize, s: f64| -> Vec<f64> {
        (0..c * n)
            .map(|q| {
                let v = q % n;
                let (i, j, l) = ((v % w) as f64, ((v / w) % h) as f64, (v / (w * h)) as f64);
                (0.7 * i + s).sin() * (0.4 * j - 0.3 * s).cos()
                    + (0.5 * l + 0.9 * j + s).sin()
                    + 0.3 * noise[k * c * n + q]
            })
            .collect()
    };
    let f = tex(0, seed as f64);
    // the warped image: a contrast-changed, partly unrelated version of the fixed one
    let g = tex(1, seed as f64 + 2.0);
    let wv: Vec<f64> = f.iter().zip(&g).map(|(a, b)| -0.8 * a + 1.2 * b + 2.0).collect();
    let m: Vec<f64> = (0..n)
        .map(|v| {
            let x = noise[2 * c * n + v];
            if v % w == 0 || x < -0.6 {
                0.0
            } else if x > 0.5 {
                0.5
            } else {
                1.0
            }
        })
        .collect();
    (t(f, &[1, c, d, h, w]), t(wv, &[1, c, d, h, w]), t(m, &[1, 1, d, h, w]))
}

#[test]
fn local_ncc_equals_the_composed_loss_and_its_gradient() {
    for (c, d, h, w) in [(1, 1, 13, 11), (1, 7, 6, 9), (2, 5, 8, 4), (1, 3, 1, 12)] {
        for radius in 1..=4 {
            let r = [d, h, w].map(|n| if n > 1 { radius } else { 0 });
            let (f, wv, m) = ncc_inputs(c, d, h, w, radius as u64 + 10 * d as u64);
            for dt in [DType::F64, DType::F32] {
                let (f, wv, m) = (f.to_dtype(dt).unwrap(), wv.to_dtype(dt).unwrap(), m.to_dtype(dt).unwrap());
                let value = |x: &Tensor| x.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap();
                let grad = |fused: bool| -> (f64, Vec<f64>) {
                    let var = Var::from_tensor(&wv).unwrap();
                    let loss = if fused {
                        local_ncc(&f, var.as_tensor(), &m, r).unwrap()
                    } else {
                        local_ncc_composed(&f, var.as_tensor(), &m, r)
                    };
                    let g = loss.backward().unwrap().get(var.as_tensor()).unwrap().clone();
                    (value(&loss), g.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1().unwrap())
                };
                let ((a, ga), (b, gb)) = (grad(true), grad(false));
                let tol = if dt == DType::F64 { 1e-10 } else { 1e-5 };
                assert!((a - b).abs() <= tol * b.abs().max(1.0), "{dt:?} {c}x{d}x{h}x{w} r {radius}: {a} vs {b}");
                assert!(a > 0.05 && a < 1.0, "a nontrivial loss {a}");
                let scale = gb.iter().fold(0.0f64, |s, v| s.max(v.abs()));
                let worst = ga.iter().zip(&gb).fold(0.0f64, |s, (x, y)| s.max((x - y).abs()));
                let gtol = if dt == DType::F64 { 1e-9 } else { 2e-3 };
                assert!(
                    worst <= gtol * scale,
                    "{dt:?} {c}x{d}x{h}x{w} r {radius}: gradient off by {worst:e} of {scale:e}"
                );
            }
        }
    }
}

#[test]
fn local_ncc_gradient_matches_finite_differences() {
    for (c, d, h, w, r) in [(1, 1, 9, 8, [0, 2, 2]), (1, 5, 4, 6, [1, 2, 3]), (2, 4, 5, 3, [4, 1, 2])] {
        let (f, wv, m) = ncc_inputs(c, d, h, w, 3);
        check_grad(&wv, &move |x| local_ncc(&f, x, &m, r).unwrap(), 1e-6);
    }
}

#[test]
fn local_ncc_is_one_minus_one_for_affine_copies_and_rejects_bad_shapes() {
    let (f, _, m) = ncc_inputs(1, 4, 6, 7, 1);
    let ones = Tensor::ones_like(&m).unwrap();
    for mask in [&m, &ones] {
        let l = local_ncc(&f, &f.affine(-2.0, 5.0).unwrap(), mask, [1, 2, 2]).unwrap().to_scalar::<f64>().unwrap();
        assert!(l < 1e-3, "{l}");
    }
    assert!(local_ncc(&f, &f.narrow(2, 0, 3).unwrap(), &m, [1, 1, 1]).is_err());
    assert!(local_ncc(&f, &f, &f.narrow(4, 0, 3).unwrap(), [1, 1, 1]).is_err());
}

#[test]
fn displaced_sampler_equals_the_composed_points_and_sampler() {
    // one channel (the intensity map of the NCC level, its own fast path) and several
    for c in [1, 2] {
        let (d, h, w) = (4, 5, 6);
        let moving = volume(1, c, d, h, w);
        // a fixed-side grid of 3×4×5 points, spread beyond the volume so every padding branch runs
        let np = 60;
        let base = points(1, np, 1.15, 21);
        let lin = t(vec![0.3, -0.1, 0.05, 0.02, 0.25, -0.07, 0.1, 0.04, 0.2], &[3, 3]);
        let u = t(rand_vec(3 * np, 5), &[1, 3, 3, 4, 5]);
        let composed = |u: &Tensor, pad: Padding| -> Tensor {
            let off = u.reshape((3, np)).unwrap().t().unwrap().matmul(&lin).unwrap().unsqueeze(0).unwrap();
            grid_sample(&moving, &base.broadcast_add(&off).unwrap(), Interpolation::Linear, pad).unwrap()
        };
        for pad in [Padding::Zeros, Padding::Border, Padding::Extent] {
            let s = DisplacedSampler::new(&moving, &base, &lin, pad).unwrap();
            let (a, b) = (s.sample(&u).unwrap(), composed(&u, pad));
            assert_eq!(a.dims(), [1, c, np]);
            let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
            assert!(diff < 1e-12, "{pad:?}: {diff:e}");
            let sp = s.clone();
            check_grad(&u, &move |x| sp.sample(x).unwrap(), 1e-6);
            // the same gradient as the composition's
            let (va, vb) = (Var::from_tensor(&u).unwrap(), Var::from_tensor(&u).unwrap());
            let r = t(rand_vec(c * np, 8), &[1, c, np]);
            let ga = (s.sample(va.as_tensor()).unwrap() * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let gb = (composed(vb.as_tensor(), pad) * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let diff = (ga.get(va.as_tensor()).unwrap() - gb.get(vb.as_tensor()).unwrap())
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
            assert!(diff < 1e-12, "{pad:?} gradient: {diff:e}");
            let pts = s.points(&u).unwrap();
            let want = base.broadcast_add(&u.reshape((3, np)).unwrap().t().unwrap().matmul(&lin).unwrap()).unwrap();
            assert!((pts - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap() < 1e-12);
        }
        assert!(DisplacedSampler::new(&moving, &base, &lin, Padding::Border)
            .unwrap()
            .sample(&u.narrow(4, 0, 4).unwrap())
            .is_err());
    }
}

#[test]
fn squaring_step_equals_the_composed_step() {
    let dims = [3, 4, 5];
    let np = 60;
    // the grid's own normalised voxel centres, as the exponential's plan has them
    let mut b = Vec::new();
    for k in 0..3 {
        for j in 0..4 {
            for i in 0..5 {
                b.extend([i as f64 / 2.0 - 1.0, j as f64 / 1.5 - 1.0, k as f64 - 1.0]);
            }
        }
    }
    let base = t(b, &[1, np, 3]);
    let lin = t(vec![0.3, -0.1, 0.05, 0.02, 0.25, -0.07, 0.1, 0.04, 0.4], &[3, 3]);
    let u = t(rand_vec(3 * np, 17).into_iter().map(|v| 1.5 * v).collect(), &[1, 3, 3, 4, 5]);
    let composed = |u: &Tensor| -> Tensor {
        let off = u.reshape((3, np)).unwrap().t().unwrap().matmul(&lin).unwrap().unsqueeze(0).unwrap();
        let at = grid_sample(u, &base.broadcast_add(&off).unwrap(), Interpolation::Linear, Padding::Border).unwrap();
        (u + at.reshape(u.shape()).unwrap()).unwrap()
    };
    let step = SquaringStep::new(&base, &lin, dims).unwrap();
    let diff = (step.apply(&u).unwrap() - composed(&u)).unwrap().abs().unwrap().max_all().unwrap();
    assert!(diff.to_scalar::<f64>().unwrap() < 1e-12);
    let s = step.clone();
    check_grad(&u, &move |x| s.apply(x).unwrap(), 1e-6);
    let (va, vb) = (Var::from_tensor(&u).unwrap(), Var::from_tensor(&u).unwrap());
    let r = t(rand_vec(3 * np, 4), &[1, 3, 3, 4, 5]);
    // two steps, as the exponential chains them
    let ga = (step.apply(&step.apply(va.as_tensor()).unwrap()).unwrap() * &r).unwrap().sum_all().unwrap().backward();
    let gb = (composed(&composed(vb.as_tensor())) * &r).unwrap().sum_all().unwrap().backward();
    let (ga, gb) = (ga.unwrap(), gb.unwrap());
    let d = (ga.get(va.as_tensor()).unwrap() - gb.get(vb.as_tensor()).unwrap()).unwrap().abs().unwrap().max_all();
    assert!(d.unwrap().to_scalar::<f64>().unwrap() < 1e-11);
    assert!(step.apply(&u.narrow(4, 0, 4).unwrap()).is_err());
}

/// Timings of the registration's full-resolution NCC iteration parts, composed vs fused, on the
/// T1 → Colin27 pair's finest grid (`cargo test --release -p obelisk-segmentation --lib
/// ncc_timings -- --ignored --nocapture`).
#[test]
#[ignore]
fn ncc_timings() {
    use std::time::Instant;
    let (d, h, w) = (79, 95, 79);
    let n = d * h * w;
    let (f, wv, m) = ncc_inputs(1, d, h, w, 1);
    let (f, wv, m) =
        (f.to_dtype(DType::F32).unwrap(), wv.to_dtype(DType::F32).unwrap(), m.to_dtype(DType::F32).unwrap());
    let time = |name: &str, run: &dyn Fn()| {
        run();
        let t = Instant::now();
        for _ in 0..5 {
            run();
        }
        eprintln!("{name:40} {:8.1} ms", t.elapsed().as_secs_f64() * 200.0);
    };
    let ncc = |fused: bool| {
        let var = Var::from_tensor(&wv).unwrap();
        let l = if fused {
            local_ncc(&f, var.as_tensor(), &m, [2; 3]).unwrap()
        } else {
            local_ncc_composed(&f, var.as_tensor(), &m, [2; 3])
        };
        l.backward().unwrap();
    };
    time("local NCC composed, forward + backward", &|| ncc(false));
    time("local NCC fused, forward + backward", &|| ncc(true));
    let moving = wv.clone();
    let base = t(rand_vec(3 * n, 3).into_iter().map(|v| v * 0.9).collect(), &[1, n, 3]).to_dtype(DType::F32).unwrap();
    let lin = t(vec![0.01, 0.0, 0.0, 0.0, 0.012, 0.0, 0.0, 0.0, 0.01], &[3, 3]).to_dtype(DType::F32).unwrap();
    let u = t(rand_vec(3 * n, 4), &[1, 3, d, h, w]).to_dtype(DType::F32).unwrap();
    let sampler = DisplacedSampler::new(&moving, &base, &lin, Padding::Border).unwrap();
    let sample = |fused: bool| {
        let var = Var::from_tensor(&u).unwrap();
        let s = if fused {
            sampler.sample(var.as_tensor()).unwrap()
        } else {
            let off = var.as_tensor().reshape((3, n)).unwrap().t().unwrap().matmul(&lin).unwrap().unsqueeze(0).unwrap();
            grid_sample(&moving, &base.broadcast_add(&off).unwrap(), Interpolation::Linear, Padding::Border).unwrap()
        };
        s.sum_all().unwrap().backward().unwrap();
    };
    time("points + sampler composed, fwd + bwd", &|| sample(false));
    time("points + sampler fused, fwd + bwd", &|| sample(true));
    let (cd, ch, cw) = (40, 48, 40);
    let cn = cd * ch * cw;
    let mut b = Vec::new();
    for k in 0..cd {
        for j in 0..ch {
            for i in 0..cw {
                b.extend([i as f64 / 19.5 - 1.0, j as f64 / 23.5 - 1.0, k as f64 / 19.5 - 1.0]);
            }
        }
    }
    let cbase = t(b, &[1, cn, 3]).to_dtype(DType::F32).unwrap();
    let v = (t(rand_vec(3 * cn, 9), &[1, 3, cd, ch, cw]).to_dtype(DType::F32).unwrap() * 0.02).unwrap();
    let step = SquaringStep::new(&cbase, &lin, [cd, ch, cw]).unwrap();
    let squarings = |fused: bool| {
        let var = Var::from_tensor(&v).unwrap();
        let mut x = var.as_tensor().clone();
        for _ in 0..6 {
            x = if fused {
                step.apply(&x).unwrap()
            } else {
                let off = x.reshape((3, cn)).unwrap().t().unwrap().matmul(&lin).unwrap().unsqueeze(0).unwrap();
                let at = grid_sample(&x, &cbase.broadcast_add(&off).unwrap(), Interpolation::Linear, Padding::Border)
                    .unwrap();
                (&x + at.reshape(x.shape()).unwrap()).unwrap()
            };
        }
        x.sum_all().unwrap().backward().unwrap();
    };
    time("6 squarings (control grid) composed", &|| squarings(false));
    time("6 squarings (control grid) fused", &|| squarings(true));
    let dense = |_: bool| {
        let var = Var::from_tensor(&v).unwrap();
        resize(var.as_tensor(), [d, h, w]).unwrap().sum_all().unwrap().backward().unwrap();
    };
    time("control -> dense resize, fwd + bwd", &|| dense(true));
    let pen = |_: bool| {
        let var = Var::from_tensor(&v).unwrap();
        let s = bspline_smooth3d(var.as_tensor(), [2.0; 3]).unwrap();
        (var.as_tensor() - s).unwrap().sqr().unwrap().mean_all().unwrap().backward().unwrap();
    };
    time("B-spline penalty (control grid), fwd + bwd", &|| pen(true));
}
