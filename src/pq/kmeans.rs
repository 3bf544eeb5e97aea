//! k-means with k-means++ initialisation, deterministic for a given RNG stream.

use super::rng::Rng;
use std::collections::HashSet;

pub struct KMeans {
    /// `k × d` centroids, row-major.
    pub centroids: Vec<f32>,
    /// How many distinct rows the data had, when that is fewer than `k` (the extra prototypes
    /// then repeat the last distinct row and are never chosen by the encoder).
    pub distinct: Option<usize>,
}

fn dist2(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum()
}

/// [`dist2`] of every row of `data` (`n × d`) to `c`, into `out`: eight rows at a time, each
/// summed in dimension order as [`dist2`] sums it (the same bits), the eight sums side by side
/// instead of one chain of dependent adds.
fn dist2_rows(data: &[f32], d: usize, c: &[f32], out: &mut [f32]) {
    const R: usize = 8;
    let full = out.len() / R * R;
    for (rows, o) in data[..full * d].chunks_exact(R * d).zip(out.chunks_exact_mut(R)) {
        let mut acc = [0f32; R];
        for (t, &cv) in c.iter().enumerate() {
            for (l, a) in acc.iter_mut().enumerate() {
                let e = rows[l * d + t] - cv;
                *a += e * e;
            }
        }
        o.copy_from_slice(&acc);
    }
    for (i, o) in out.iter_mut().enumerate().skip(full) {
        *o = dist2(&data[i * d..(i + 1) * d], c);
    }
}

/// Centroids transposed to `[d][k]` (padded to whole groups of 16), so that one row's distances
/// to 16 centroids are computed side by side in vector lanes. Each distance still sums its
/// squared differences in dimension order, as [`dist2`] does, so [`Lanes::nearest`]
/// returns exactly what a scalar scan of `dist2` returns (the tests' `nearest`).
struct Lanes {
    /// `[group][dim][16]`
    t: Vec<[f32; 16]>,
    k: usize,
    d: usize,
}

impl Lanes {
    fn new(centroids: &[f32], k: usize, d: usize) -> Lanes {
        let groups = k.div_ceil(16);
        let mut t = vec![[0f32; 16]; groups * d];
        for (j, c) in centroids.chunks_exact(d).enumerate() {
            for (dim, &v) in c.iter().enumerate() {
                t[(j / 16) * d + dim][j % 16] = v;
            }
        }
        Lanes { t, k, d }
    }

    /// Squared distances of `x` to the centroids of group `g` (16 lanes; past `k`: padding).
    #[inline(always)]
    fn distances(&self, x: &[f32], g: usize) -> [f32; 16] {
        let mut acc = [0f32; 16];
        for (&xv, col) in x.iter().zip(&self.t[g * self.d..(g + 1) * self.d]) {
            for l in 0..16 {
                let e = xv - col[l];
                acc[l] += e * e;
            }
        }
        acc
    }

    /// [`Lanes::nearest`] of `R` rows side by side: their scans for the smallest distance (a
    /// chain of dependent compares each) overlap instead of running one after another.
    #[inline(always)]
    fn nearest_rows<const R: usize>(&self, xs: [&[f32]; R]) -> [usize; R] {
        let mut best = [(0, f32::INFINITY); R];
        for g in 0..self.k.div_ceil(16) {
            let acc: [[f32; 16]; R] = std::array::from_fn(|r| self.distances(xs[r], g));
            for l in 0..16.min(self.k - g * 16) {
                for (b, a) in best.iter_mut().zip(&acc) {
                    if a[l] < b.1 {
                        *b = (g * 16 + l, a[l]);
                    }
                }
            }
        }
        best.map(|b| b.0)
    }

    /// Every row's nearest centroid into `assign`, four rows at a time; whether any changed.
    /// Compiled for AVX2 too, where the machine has it: 16 lanes in two registers instead of
    /// four. Adds, subtractions, products and compares round the same at any width (no fused
    /// multiply-adds), so the result is the same.
    fn assign(&self, data: &[f32], assign: &mut [usize]) -> bool {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2 (checked above)
            return unsafe { self.assign_avx2(data, assign) };
        }
        self.assign_rows(data, assign)
    }

    /// [`Lanes::assign`] compiled for AVX2.
    ///
    /// # Safety
    /// The CPU has AVX2.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn assign_avx2(&self, data: &[f32], assign: &mut [usize]) -> bool {
        self.assign_rows(data, assign)
    }

    #[inline(always)]
    fn assign_rows(&self, data: &[f32], assign: &mut [usize]) -> bool {
        let d = self.d;
        let mut changed = false;
        let mut set = |a: &mut usize, j: usize| {
            changed |= *a != j;
            *a = j;
        };
        let full = assign.len() / 4 * 4;
        for (rows, a) in data[..full * d].chunks_exact(4 * d).zip(assign.chunks_exact_mut(4)) {
            let js = self.nearest_rows::<4>(std::array::from_fn(|r| &rows[r * d..(r + 1) * d]));
            for (a, j) in a.iter_mut().zip(js) {
                set(a, j);
            }
        }
        for (i, a) in assign.iter_mut().enumerate().skip(full) {
            set(a, self.nearest(&data[i * d..(i + 1) * d]));
        }
        changed
    }

    fn nearest(&self, x: &[f32]) -> usize {
        self.nearest_rows([x])[0]
    }
}

/// Distinct rows, up to `cap` of them, in first-seen order.
fn distinct_rows(data: &[f32], d: usize, cap: usize) -> Vec<usize> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for (i, row) in data.chunks_exact(d).enumerate() {
        let key: Vec<u32> = row.iter().map(|v| if *v == 0.0 { 0 } else { v.to_bits() }).collect();
        if seen.insert(key) {
            out.push(i);
            if out.len() > cap {
                break;
            }
        }
    }
    out
}

/// Cluster `n × d` rows into `k` centroids with `iters` Lloyd iterations.
pub fn kmeans(data: &[f32], d: usize, k: usize, iters: usize, rng: &mut Rng) -> KMeans {
    let n = data.len() / d;
    let row = |i: usize| &data[i * d..(i + 1) * d];
    let uniq = distinct_rows(data, d, k);
    if uniq.len() <= k {
        // Not more distinct rows than prototypes: the rows themselves are the exact optimum.
        let mut centroids: Vec<f32> = uniq.iter().flat_map(|&i| row(i).to_vec()).collect();
        let last = uniq.last().map(|&i| row(i).to_vec()).unwrap_or_else(|| vec![0.0; d]);
        while centroids.len() < k * d {
            centroids.extend_from_slice(&last);
        }
        return KMeans {
            centroids,
            distinct: (uniq.len() < k).then_some(uniq.len()),
        };
    }
    // k-means++ seeding
    let mut centroids = Vec::with_capacity(k * d);
    centroids.extend_from_slice(row(rng.below(n)));
    let mut best = vec![0f32; n];
    dist2_rows(data, d, &centroids[..d], &mut best);
    let mut to_new = vec![0f32; n];
    while centroids.len() < k * d {
        let total: f64 = best.iter().map(|&v| v as f64).sum();
        let pick = if total <= 0.0 {
            rng.below(n)
        } else {
            let mut target = rng.next_f64() * total;
            let mut idx = n - 1;
            for (i, &v) in best.iter().enumerate() {
                target -= v as f64;
                if target <= 0.0 && v > 0.0 {
                    idx = i;
                    break;
                }
            }
            idx
        };
        let c = row(pick).to_vec();
        dist2_rows(data, d, &c, &mut to_new);
        for (b, &e) in best.iter_mut().zip(&to_new) {
            *b = b.min(e);
        }
        centroids.extend_from_slice(&c);
    }
    // Lloyd iterations
    let mut assign = vec![0usize; n];
    for _ in 0..iters {
        let mut changed = Lanes::new(&centroids, k, d).assign(data, &mut assign);
        let mut sums = vec![0f64; k * d];
        let mut counts = vec![0usize; k];
        for (i, &a) in assign.iter().enumerate() {
            counts[a] += 1;
            for (s, v) in sums[a * d..(a + 1) * d].iter_mut().zip(row(i)) {
                *s += *v as f64;
            }
        }
        for j in 0..k {
            if counts[j] > 0 {
                for t in 0..d {
                    centroids[j * d + t] = (sums[j * d + t] / counts[j] as f64) as f32;
                }
            }
        }
        changed |= reseed_empty(data, d, &mut centroids, &assign, &counts);
        if !changed {
            break;
        }
    }
    KMeans {
        centroids,
        distinct: None,
    }
}

/// Move each empty cluster to a different row, farthest from its centroid first (ties: lowest
/// row), skipping rows equal to one already taken, so several empty clusters do not all land on
/// the same row. Returns whether any cluster moved.
fn reseed_empty(data: &[f32], d: usize, centroids: &mut [f32], assign: &[usize], counts: &[usize]) -> bool {
    let empty: Vec<usize> = (0..counts.len()).filter(|&j| counts[j] == 0).collect();
    if empty.is_empty() {
        return false;
    }
    let row = |i: usize| &data[i * d..(i + 1) * d];
    let dist: Vec<f32> = (0..assign.len())
        .map(|i| dist2(row(i), &centroids[assign[i] * d..(assign[i] + 1) * d]))
        .collect();
    let mut order: Vec<usize> = (0..assign.len()).collect();
    order.sort_by(|&a, &b| dist[b].total_cmp(&dist[a]).then(a.cmp(&b)));
    let mut taken: Vec<usize> = Vec::with_capacity(empty.len());
    for i in order {
        if taken.len() == empty.len() {
            break;
        }
        if !taken.iter().any(|&t| row(t) == row(i)) {
            taken.push(i);
        }
    }
    for (&j, &i) in empty.iter().zip(&taken) {
        centroids[j * d..(j + 1) * d].copy_from_slice(row(i));
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Nearest centroid by a scalar scan (lowest index on ties): the reference for [`Lanes`].
    fn nearest(x: &[f32], centroids: &[f32], d: usize) -> usize {
        let mut best = (0, f32::INFINITY);
        for (i, c) in centroids.chunks_exact(d).enumerate() {
            let e = dist2(x, c);
            if e < best.1 {
                best = (i, e);
            }
        }
        best.0
    }

    #[test]
    fn recovers_exactly_k_distinct_points() {
        let pts: Vec<Vec<f32>> = (0..16)
            .map(|i| vec![i as f32, (i * i) as f32 * 0.1, -(i as f32)])
            .collect();
        let mut data = Vec::new();
        let mut rng = Rng::new(3);
        for _ in 0..500 {
            data.extend_from_slice(&pts[rng.below(16)]);
        }
        let km = kmeans(&data, 3, 16, 10, &mut Rng::new(1));
        for p in &pts {
            let j = nearest(p, &km.centroids, 3);
            assert_eq!(&km.centroids[j * 3..j * 3 + 3], p.as_slice());
        }
    }

    #[test]
    fn fewer_distinct_rows_than_k_is_reported() {
        let data = vec![1.0, 2.0, 3.0, 4.0, 1.0, 2.0];
        let km = kmeans(&data, 2, 16, 10, &mut Rng::new(1));
        assert_eq!(km.distinct, Some(2));
        assert_eq!(km.centroids.len(), 32);
    }

    #[test]
    fn empty_clusters_move_to_different_rows() {
        // every row assigned to cluster 0; clusters 1..3 are empty
        let data: Vec<f32> = vec![0.0, 0.1, 5.0, 9.0, 9.0, -7.0];
        let mut centroids = vec![0.0, 0.0, 0.0, 0.0];
        let assign = vec![0; 6];
        assert!(reseed_empty(&data, 1, &mut centroids, &assign, &[6, 0, 0, 0]));
        // farthest first, the duplicate 9.0 skipped
        assert_eq!(centroids, vec![0.0, 9.0, -7.0, 5.0]);
    }

    #[test]
    fn lloyd_iterations_find_separated_clusters() {
        // more distinct rows than k, so the Lloyd path runs (not the exact-recovery return)
        let centers = [[0.0f32, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]];
        let mut rng = Rng::new(4);
        let mut data = Vec::new();
        for i in 0..400 {
            let c = centers[i % 4];
            data.push(c[0] + (rng.next_f64() as f32 - 0.5) * 0.5);
            data.push(c[1] + (rng.next_f64() as f32 - 0.5) * 0.5);
        }
        let km = kmeans(&data, 2, 4, 20, &mut Rng::new(2));
        assert_eq!(km.distinct, None);
        for c in centers {
            let j = nearest(&c, &km.centroids, 2);
            assert!(
                dist2(&c, &km.centroids[j * 2..j * 2 + 2]) < 0.05,
                "{c:?} vs {:?}",
                km.centroids
            );
        }
    }

    #[test]
    fn deterministic_for_a_seed() {
        let mut rng = Rng::new(9);
        let data: Vec<f32> = (0..3000).map(|_| rng.next_f64() as f32).collect();
        let a = kmeans(&data, 3, 16, 15, &mut Rng::new(5)).centroids;
        let b = kmeans(&data, 3, 16, 15, &mut Rng::new(5)).centroids;
        assert_eq!(a, b);
    }

    /// Eight rows at a time give each row's [`dist2`] bit for bit: any `d`, a count of rows
    /// that leaves a partial group, negative, large, infinite and NaN values.
    #[test]
    fn rows_side_by_side_give_each_rows_distance() {
        let mut rng = Rng::new(13);
        for (n, d) in [(1usize, 1usize), (8, 9), (19, 9), (37, 4), (16, 25), (7, 3)] {
            let mut data: Vec<f32> = (0..n * d).map(|_| (rng.next_f64() as f32 - 0.5) * 1e3).collect();
            data[0] = f32::INFINITY;
            if n * d > 5 {
                data[5] = f32::NAN;
            }
            let c: Vec<f32> = (0..d).map(|_| rng.next_f64() as f32 * 3e2).collect();
            let mut got = vec![1f32; n];
            dist2_rows(&data, d, &c, &mut got);
            for (i, g) in got.iter().enumerate() {
                assert_eq!(
                    g.to_bits(),
                    dist2(&data[i * d..(i + 1) * d], &c).to_bits(),
                    "n {n} d {d} row {i}"
                );
            }
        }
    }

    /// The lane form picks exactly the centroid the scalar scan picks, ties (repeated
    /// centroids) and a partial last group of 16 included.
    #[test]
    fn lanes_pick_the_same_centroid_as_the_scalar_scan() {
        let mut rng = Rng::new(11);
        for (k, d) in [(1, 9), (3, 2), (16, 9), (20, 4), (256, 3)] {
            let mut centroids: Vec<f32> = (0..k * d)
                .map(|_| (rng.next_f64() as f32 * 8.0).round() / 8.0)
                .collect();
            if k > 2 {
                // a repeated centroid: the lower index must win
                let (a, b) = centroids.split_at_mut(2 * d);
                b[..d].copy_from_slice(&a[d..2 * d]);
            }
            let lanes = Lanes::new(&centroids, k, d);
            for _ in 0..500 {
                let x: Vec<f32> = (0..d).map(|_| (rng.next_f64() as f32 * 8.0).round() / 8.0).collect();
                assert_eq!(lanes.nearest(&x), nearest(&x, &centroids, d), "k {k} d {d} x {x:?}");
            }
            // rows four at a time (and a remainder), as the Lloyd iterations assign them
            let data: Vec<f32> = (0..23 * d)
                .map(|_| (rng.next_f64() as f32 * 8.0).round() / 8.0)
                .collect();
            let mut got = vec![usize::MAX; 23];
            assert!(lanes.assign(&data, &mut got));
            let want: Vec<usize> = data.chunks_exact(d).map(|x| nearest(x, &centroids, d)).collect();
            assert_eq!(got, want, "k {k} d {d}");
            assert!(!lanes.assign(&data, &mut got), "nothing changes the second time");
            // the build's baseline instructions, where `assign` took AVX2
            let mut base = vec![usize::MAX; 23];
            assert!(lanes.assign_rows(&data, &mut base));
            assert_eq!(base, want, "k {k} d {d}, baseline");
        }
        // values off any grid, so every distance rounds and only the same summation order
        // gives the same bits; rows and centroids with NaN and infinities
        let special = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY];
        for (k, d) in [(16, 9), (20, 9), (7, 25)] {
            let mut centroids: Vec<f32> = (0..k * d).map(|_| rng.next_f64() as f32 * 3.0 - 1.0).collect();
            centroids[d + 2] = f32::NAN;
            centroids[3 * d] = f32::INFINITY;
            let lanes = Lanes::new(&centroids, k, d);
            // whole sets of such rows, as the Lloyd iterations assign them (AVX2 where present)
            let mut data: Vec<f32> = (0..41 * d).map(|_| rng.next_f64() as f32 * 3.0 - 1.0).collect();
            for (i, v) in special.iter().enumerate() {
                data[(7 * i + 3) * d + i] = *v;
            }
            let mut got = vec![usize::MAX; 41];
            lanes.assign(&data, &mut got);
            let want: Vec<usize> = data.chunks_exact(d).map(|x| nearest(x, &centroids, d)).collect();
            assert_eq!(got, want, "k {k} d {d}");
            for i in 0..2000 {
                let mut x: Vec<f32> = (0..d).map(|_| rng.next_f64() as f32 * 3.0 - 1.0).collect();
                if i % 50 == 0 {
                    x[i % d] = special[(i / 50) % 3];
                }
                assert_eq!(lanes.nearest(&x), nearest(&x, &centroids, d), "k {k} d {d} x {x:?}");
                let y: Vec<f32> = x.iter().rev().copied().collect();
                assert_eq!(
                    lanes.nearest_rows([&x, &y, &x, &y]),
                    [&x, &y, &x, &y].map(|r| nearest(r, &centroids, d)),
                    "k {k} d {d}"
                );
                for (j, c) in centroids.chunks_exact(d).enumerate() {
                    let (lane, scalar) = (lanes.distances(&x, j / 16)[j % 16], dist2(&x, c));
                    assert!(
                        lane.to_bits() == scalar.to_bits() || (lane.is_nan() && scalar.is_nan()),
                        "centroid {j}: {lane} vs {scalar}"
                    );
                }
            }
        }
    }
}
