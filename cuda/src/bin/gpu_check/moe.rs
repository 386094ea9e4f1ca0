//! Mixture of experts: routing (moe.cu `moe_route`), the experts' products through the
//! ids (matmul.cu `matvec_id_*`) and the weighted combine (`moe_combine`), against
//! engine/src/model/moe.rs (`Routing::route`, `Experts::forward`), copied here as plain
//! code because this crate does not depend on the engine.

use cudarc::driver::{CudaSlice, DevicePtr, PushKernelArg};
use turbine_cpu::{ops, GgmlType};

use super::{
    all, bit_mismatches, cfg, cpu_matmul, drv, kernel_for, nse, poisoned, quantize, random_weights, report,
    report_exact, Check, Kernels, Rng, NULL,
};

/// moe.rs's `Gating`, numbered as moe.cu's GATING_*.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Gating {
    Softmax = 0,
    SoftmaxOverSelected = 1,
    Sigmoid = 2,
}

/// moe.rs's `Routing`.
#[derive(Clone, Copy, Debug)]
struct Routing {
    n_expert: usize,
    n_used: usize,
    gating: Gating,
    normalize: bool,
    scale: f32,
    groups: Option<(usize, usize)>,
}

/// `Routing::route`: each token's experts, best first, and their weights, [tokens × k].
fn route(r: &Routing, logits: &[f32], selection_bias: Option<&[f32]>) -> (Vec<usize>, Vec<f32>) {
    let (n, k) = (r.n_expert, r.n_used);
    let (mut experts, mut weights) = (Vec::new(), Vec::new());
    for row in logits.chunks_exact(n) {
        let scores = match r.gating {
            Gating::Softmax => softmax(row),
            Gating::SoftmaxOverSelected => row.to_vec(),
            Gating::Sigmoid => row.iter().map(|&x| 1.0 / (1.0 + (-x).exp())).collect(),
        };
        let mut select = scores.clone();
        if let Some(bias) = selection_bias {
            select.iter_mut().zip(bias).for_each(|(s, b)| *s += b);
        }
        if let Some((groups, kept)) = r.groups {
            mask_weak_groups(&mut select, groups, kept);
        }
        let chosen = &top_k(&select, k)[..];
        let mut w: Vec<f32> = chosen.iter().map(|&e| scores[e]).collect();
        if r.gating == Gating::SoftmaxOverSelected {
            w = softmax(&w);
        }
        if r.normalize {
            let sum = w.iter().sum::<f32>().max(6.103_515_6e-5);
            w.iter_mut().for_each(|x| *x /= sum);
        }
        if r.scale != 1.0 {
            w.iter_mut().for_each(|x| *x *= r.scale);
        }
        experts.extend_from_slice(chosen);
        weights.extend(w);
    }
    (experts, weights)
}

/// moe.rs's `top_k`: indices of the k largest, best first; ties go to the lower index.
fn top_k(x: &[f32], k: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..x.len()).collect();
    order.sort_by(|&a, &b| x[b].total_cmp(&x[a]).then(a.cmp(&b)));
    order.truncate(k);
    order
}

/// moe.rs's `mask_weak_groups`.
fn mask_weak_groups(select: &mut [f32], groups: usize, kept: usize) {
    let per_group = select.len() / groups.max(1);
    if groups <= 1 || per_group == 0 {
        return;
    }
    let group_scores: Vec<f32> =
        select.chunks_exact(per_group).map(|g| top_k(g, 2).iter().map(|&i| g[i]).sum()).collect();
    let keep = top_k(&group_scores, kept);
    for (g, chunk) in select.chunks_exact_mut(per_group).enumerate() {
        if !keep.contains(&g) {
            chunk.iter_mut().for_each(|s| *s = f32::NEG_INFINITY);
        }
    }
}

/// moe.rs's `softmax`: its sum in f64.
fn softmax(row: &[f32]) -> Vec<f32> {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f32> = row.iter().map(|&x| (x - max).exp()).collect();
    let sum: f64 = e.iter().map(|&x| f64::from(x)).sum();
    let inv = (1.0 / sum) as f32;
    e.iter().map(|&x| x * inv).collect()
}

/// moe.cu's warps (tokens) per block of moe_route.
const ROUTE_WARPS: u32 = 4;

/// The router's GPU picks for `logits` ([tokens][n_expert]): (ids, weights).
fn gpu_route(k: &Kernels, r: &Routing, logits: &[f32], bias: Option<&[f32]>) -> Result<(Vec<i32>, Vec<f32>), String> {
    let s = &k.stream;
    let tokens = logits.len() / r.n_expert;
    let ld = drv(s.clone_htod(logits))?;
    let bd = bias.map(|b| drv(s.clone_htod(b))).transpose()?;
    let bias_ptr = bd.as_ref().map_or(NULL, |b| b.device_ptr(s).0);
    let mut ids = drv(s.clone_htod(&vec![-1i32; tokens * r.n_used]))?;
    let mut weights = poisoned(k, tokens * r.n_used)?;
    let ints = |x: usize| x as i32;
    let (groups, kept) = r.groups.unwrap_or((0, 0));
    let args = [ints(tokens), ints(r.n_expert), ints(r.n_used), r.gating as i32, i32::from(r.normalize)];
    let (groups, kept) = (ints(groups), ints(kept));
    // SAFETY: the arguments match the kernel's signature and the buffers' sizes; `bd`
    // outlives the launch; n_expert ≤ 512, k ≤ 32, groups ≤ 32 (moe.cu's limits).
    drv(unsafe {
        s.launch_builder(k.get("moe_route")?)
            .arg(&ld)
            .arg(&bias_ptr)
            .arg(&mut ids)
            .arg(&mut weights)
            .arg(&args[0])
            .arg(&args[1])
            .arg(&args[2])
            .arg(&args[3])
            .arg(&args[4])
            .arg(&r.scale)
            .arg(&groups)
            .arg(&kept)
            .launch(cfg(((tokens as u32).div_ceil(ROUTE_WARPS), 1, 1), (32, ROUTE_WARPS, 1)))
    })?;
    Ok((drv(s.clone_dtoh(&ids))?, drv(s.clone_dtoh(&weights))?))
}

/// Each model family's routing rule on random router logits (some rounded to force ties):
/// the same experts in the same order, and weights within f32 rounding of the exp.
pub fn check_routing(k: &Kernels, rng: &mut Rng) -> Check {
    let base = Routing { n_expert: 8, n_used: 2, gating: Gating::Softmax, normalize: true, scale: 1.0, groups: None };
    let cases = [
        ("mixtral softmax top-2 of 8", base, 9, false, false),
        ("qwen3moe softmax top-8 of 128, normalized", Routing { n_expert: 128, n_used: 8, ..base }, 7, false, false),
        (
            "gpt-oss top-4 of 32, then softmax",
            Routing { n_expert: 32, n_used: 4, gating: Gating::SoftmaxOverSelected, normalize: false, ..base },
            5,
            false,
            true,
        ),
        (
            "deepseek-v3 sigmoid, bias, 4 of 8 groups, top-8 of 256, ×2.5",
            Routing { n_expert: 256, n_used: 8, gating: Gating::Sigmoid, scale: 2.5, groups: Some((8, 4)), ..base },
            6,
            true,
            false,
        ),
        (
            "deepseek-v2 softmax, 3 of 8 groups, top-6 of 160, ×16",
            Routing { n_expert: 160, n_used: 6, normalize: false, scale: 16.0, groups: Some((8, 3)), ..base },
            4,
            false,
            true,
        ),
    ];
    let mut results = Vec::new();
    for (name, r, tokens, with_bias, ties) in cases {
        let logits: Vec<f32> = rng
            .floats(tokens * r.n_expert)
            .iter()
            .map(|&x| if ties { (x * 8.0).round() / 2.0 } else { x * 4.0 })
            .collect();
        let bias = with_bias.then(|| rng.floats(r.n_expert).iter().map(|x| x * 0.5).collect::<Vec<f32>>());
        let (got_ids, got_w) = gpu_route(k, &r, &logits, bias.as_deref())?;
        let (want_ids, want_w) = route(&r, &logits, bias.as_deref());
        let differ = got_ids.iter().zip(&want_ids).filter(|(g, w)| **g as usize != **w).count();
        if differ > 0 {
            println!("     {name}: got {got_ids:?}\n     want {want_ids:?}");
        }
        results.push(report_exact(&format!("moe_route {name}: experts"), differ, want_ids.len()));
        results.push(report(&format!("moe_route {name}: weights"), nse(&got_w, &want_w), 1e-10));
    }
    all(results)
}

/// moe.rs's `Activation`.
#[derive(Clone, Copy)]
enum Activation {
    SwiGlu,
    SwiGluOai { alpha: f32, limit: f32 },
}

/// A layer's experts: types of gate, up and down, shapes, activation, biases.
struct ExpertsCase {
    name: &'static str,
    types: [GgmlType; 3],
    n_expert: usize,
    k: usize,
    tokens: usize,
    d: usize,
    ff: usize,
    act: Activation,
    biases: bool,
}

const EXPERTS: [ExpertsCase; 3] = [
    ExpertsCase {
        name: "gpt-oss MXFP4, biases, clamped SwiGLU",
        types: [GgmlType::MXFP4; 3],
        n_expert: 8,
        k: 4,
        tokens: 5,
        d: 256,
        ff: 288,
        act: Activation::SwiGluOai { alpha: 1.702, limit: 7.0 },
        biases: true,
    },
    ExpertsCase {
        name: "qwen3moe Q4_K gate/up, Q6_K down",
        types: [GgmlType::Q4_K, GgmlType::Q4_K, GgmlType::Q6_K],
        n_expert: 16,
        k: 4,
        tokens: 6,
        d: 512,
        ff: 256,
        act: Activation::SwiGlu,
        biases: false,
    },
    ExpertsCase {
        name: "Q8_0 gate, Q4_0 up, Q5_0 down",
        types: [GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q5_0],
        n_expert: 4,
        k: 2,
        tokens: 3,
        d: 256,
        ff: 128,
        act: Activation::SwiGlu,
        biases: false,
    },
];

/// One expert tensor [n_expert][rows][row_bytes] and its bias [n_expert][rows].
struct Tensor {
    ty: GgmlType,
    rows: usize,
    cols: usize,
    data: Vec<u8>,
    bias: Option<Vec<f32>>,
}

impl Tensor {
    fn random(ty: GgmlType, n_expert: usize, rows: usize, cols: usize, biases: bool, rng: &mut Rng) -> Tensor {
        let data = random_weights(ty, n_expert * rows, cols, rng);
        let bias = biases.then(|| rng.floats(n_expert * rows).iter().map(|x| x * 0.1).collect());
        Tensor { ty, rows, cols, data, bias }
    }

    fn expert(&self, e: usize) -> &[u8] {
        let size = self.rows * self.ty.row_bytes(self.cols).unwrap_or(0);
        &self.data[e * size..(e + 1) * size]
    }

    /// `Experts::expert`'s matmul with its bias: x [m × cols] → [m × rows].
    fn cpu(&self, e: usize, x: &[f32], m: usize) -> Vec<f32> {
        let mut y = cpu_matmul(self.ty, self.expert(e), self.rows, self.cols, x, m);
        if let Some(b) = &self.bias {
            let b = &b[e * self.rows..(e + 1) * self.rows];
            y.chunks_exact_mut(self.rows).for_each(|row| ops::add_assign(row, b));
        }
        y
    }

    /// matvec_id over every slot: [slots][rows].
    fn gpu(
        &self,
        k: &Kernels,
        ids: &CudaSlice<i32>,
        x: &(CudaSlice<i8>, CudaSlice<f32>),
        slots: usize,
        per_token: usize,
        x_per_slot: bool,
    ) -> Result<CudaSlice<f32>, String> {
        let s = &k.stream;
        let w = drv(s.clone_htod(&self.data))?;
        let bias = self.bias.as_ref().map(|b| drv(s.clone_htod(b))).transpose()?;
        let bias_ptr = bias.as_ref().map_or(NULL, |b| b.device_ptr(s).0);
        let mut y = poisoned(k, slots * self.rows)?;
        let ints = |v: usize| v as i32;
        let (rows, blocks) = (ints(self.rows), ints(self.cols / self.ty.block_size()));
        let (row_bytes, per_token, x_per_slot) =
            (ints(self.ty.row_bytes(self.cols).unwrap_or(0)), ints(per_token), i32::from(x_per_slot));
        // SAFETY: the arguments match the kernel's signature and the buffers' sizes; the
        // ids are experts of `w`; `bias` outlives the launch.
        drv(unsafe {
            s.launch_builder(k.get(&kernel_for("matvec_id", self.ty))?)
                .arg(&w)
                .arg(ids)
                .arg(&x.0)
                .arg(&x.1)
                .arg(&bias_ptr)
                .arg(&mut y)
                .arg(&rows)
                .arg(&blocks)
                .arg(&row_bytes)
                .arg(&per_token)
                .arg(&x_per_slot)
                .launch(cfg(((self.rows as u32).div_ceil(4), slots as u32, 1), (32, 4, 1)))
        })?;
        Ok(y)
    }
}

/// The activation in place on [n] gates.
fn gpu_act(k: &Kernels, act: Activation, gate: &mut CudaSlice<f32>, up: &CudaSlice<f32>, n: usize) -> Check {
    let s = &k.stream;
    let n_i = n as i32;
    let grid = cfg(((n as u32).div_ceil(256), 1, 1), (256, 1, 1));
    // SAFETY: the arguments match the kernels' signatures; both buffers hold n floats.
    drv(unsafe {
        match act {
            Activation::SwiGlu => s.launch_builder(k.get("swiglu")?).arg(gate).arg(up).arg(&n_i).launch(grid),
            Activation::SwiGluOai { alpha, limit } => {
                s.launch_builder(k.get("swiglu_oai")?).arg(gate).arg(up).arg(&n_i).arg(&alpha).arg(&limit).launch(grid)
            }
        }
    })?;
    Ok(())
}

/// `Experts::forward`'s combine: out[t] += w · y[slot] over the experts in ascending
/// order (`add_scaled_rows`), from zero. `y` is [tokens·k][d] in slot order.
fn combine(ids: &[usize], weights: &[f32], y: &[f32], tokens: usize, k: usize, d: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; tokens * d];
    let n_expert = ids.iter().max().map_or(0, |m| m + 1);
    for e in 0..n_expert {
        for (slot, _) in ids.iter().enumerate().filter(|(_, &x)| x == e) {
            let t = slot / k;
            let (dst, src) = (&mut out[t * d..(t + 1) * d], &y[slot * d..(slot + 1) * d]);
            dst.iter_mut().zip(src).for_each(|(o, &v)| *o += weights[slot] * v);
        }
    }
    out
}

/// `Experts::forward` (one rank, all experts): per expert in ascending order, its tokens'
/// rows through gate and up (+ biases), the activation, down (+ bias), each output row
/// added to its token's with the route's weight.
fn engine_experts(
    c: &ExpertsCase,
    [gate, up, down]: [&Tensor; 3],
    x: &[f32],
    ids: &[usize],
    weights: &[f32],
) -> Vec<f32> {
    let (kk, d) = (c.k, c.d);
    let mut out = vec![0.0f32; c.tokens * d];
    for e in 0..c.n_expert {
        let slots: Vec<usize> = (0..ids.len()).filter(|&i| ids[i] == e).collect();
        if slots.is_empty() {
            continue;
        }
        let m = slots.len();
        let xs: Vec<f32> = slots.iter().flat_map(|&i| x[(i / kk) * d..(i / kk + 1) * d].to_vec()).collect();
        let mut g = gate.cpu(e, &xs, m);
        let u = up.cpu(e, &xs, m);
        act(c.act, &mut g, &u);
        let y = down.cpu(e, &g, m);
        for (j, &i) in slots.iter().enumerate() {
            let dst = &mut out[(i / kk) * d..(i / kk + 1) * d];
            dst.iter_mut().zip(&y[j * d..(j + 1) * d]).for_each(|(o, &v)| *o += weights[i] * v);
        }
    }
    out
}

fn act(a: Activation, g: &mut [f32], u: &[f32]) {
    match a {
        Activation::SwiGlu => ops::swiglu(g, u),
        Activation::SwiGluOai { alpha, limit } => ops::swiglu_oai(g, u, alpha, limit),
    }
}

/// Two quantized products in a row, 8-bit activations on both sides. The second product's
/// inputs differ slightly between the two sides, so some of their 8-bit values round the
/// other way: ~5e-6 of squared error even where the first product agrees to 1e-8, and
/// ~1.5e-4 through the K-quants' coarser Q8_K (the test below measures the chain).
const EXPERTS_LIMIT: f64 = 3e-3;

/// A whole MoE FFN after the router: x → each slot's gate and up (+ biases) → activation →
/// down (+ bias) → weighted combine, on the GPU against the engine's per-expert loop; and
/// the combine alone, on the GPU's own expert outputs, to the bit.
pub fn check_experts(k: &Kernels, rng: &mut Rng) -> Check {
    let s = &k.stream;
    let mut results = Vec::new();
    for c in &EXPERTS {
        let (t, kk, d, ff) = (c.tokens, c.k, c.d, c.ff);
        let gate = Tensor::random(c.types[0], c.n_expert, ff, d, c.biases, rng);
        let up = Tensor::random(c.types[1], c.n_expert, ff, d, c.biases, rng);
        let down = Tensor::random(c.types[2], c.n_expert, d, ff, c.biases, rng);
        let x = rng.floats(t * d);
        let r = Routing {
            n_expert: c.n_expert,
            n_used: kk,
            gating: Gating::Softmax,
            normalize: true,
            scale: 1.0,
            groups: None,
        };
        let (ids, weights) = route(&r, &rng.floats(t * c.n_expert), None);

        // GPU: every slot through its expert, in one launch per product.
        let slots = t * kk;
        let ids_i: Vec<i32> = ids.iter().map(|&e| e as i32).collect();
        let (ids_d, w_d, x_d) = (drv(s.clone_htod(&ids_i))?, drv(s.clone_htod(&weights))?, drv(s.clone_htod(&x))?);
        let xq = quantize(k, &x_d, t, d)?;
        let mut g = gate.gpu(k, &ids_d, &xq, slots, kk, false)?;
        let u = up.gpu(k, &ids_d, &xq, slots, kk, false)?;
        gpu_act(k, c.act, &mut g, &u, slots * ff)?;
        let hq = quantize(k, &g, slots, ff)?;
        let y = down.gpu(k, &ids_d, &hq, slots, kk, true)?;
        let mut out = poisoned(k, t * d)?;
        let (k_i, d_i) = (kk as i32, d as i32);
        // SAFETY: the arguments match the kernel's signature and the buffers' sizes.
        drv(unsafe {
            s.launch_builder(k.get("moe_combine")?)
                .arg(&y)
                .arg(&ids_d)
                .arg(&w_d)
                .arg(&mut out)
                .arg(&k_i)
                .arg(&d_i)
                .launch(cfg((t as u32, 1, 1), (256, 1, 1)))
        })?;
        let got = drv(s.clone_dtoh(&out))?;
        let got_y = drv(s.clone_dtoh(&y))?;

        let want = engine_experts(c, [&gate, &up, &down], &x, &ids, &weights);
        let name = format!("moe experts {} ({t} tokens, top-{kk} of {})", c.name, c.n_expert);
        results.push(report(&name, nse(&got, &want), EXPERTS_LIMIT));
        let exact = combine(&ids, &weights, &got_y, t, kk, d);
        results.push(report_exact(&format!("moe_combine {}", c.name), bit_mismatches(&got, &exact), exact.len()));
    }
    all(results)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The copy of `route` keeps the engine's tests' answers (engine/src/model/moe.rs).
    #[test]
    fn route_copy_matches_the_engine_tests() {
        let r = Routing {
            n_expert: 8,
            n_used: 2,
            gating: Gating::Sigmoid,
            normalize: true,
            scale: 2.5,
            groups: Some((4, 2)),
        };
        let logits = [2.0, 1.0, 3.0, 2.5, -1.0, -1.0, 0.0, 0.5];
        let bias = [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 3.0];
        assert_eq!(route(&r, &logits, Some(&bias)).0, vec![7, 2]);
        let r = Routing { n_expert: 4, n_used: 2, gating: Gating::Softmax, normalize: false, scale: 1.0, groups: None };
        assert_eq!(route(&r, &[0.0, 3.0, 1.0, 2.0, 5.0, 0.0, 0.0, 4.0], None).0, vec![1, 3, 0, 3]);
        let r = Routing { gating: Gating::SoftmaxOverSelected, ..r };
        let (e, w) = route(&r, &[1.0, 4.0, 3.0, -2.0], None);
        assert_eq!((e, w), (vec![1, 2], softmax(&[4.0, 3.0])));
    }

    /// What exact dp4a kernels would give for the chain differs from the engine by well
    /// under the limit (a tenth).
    #[test]
    fn experts_limit_leaves_room_for_the_quantization() {
        let mut rng = Rng(99);
        for c in &EXPERTS {
            let (t, kk, d, ff) = (c.tokens, c.k, c.d, c.ff);
            let gate = Tensor::random(c.types[0], c.n_expert, ff, d, c.biases, &mut rng);
            let up = Tensor::random(c.types[1], c.n_expert, ff, d, c.biases, &mut rng);
            let down = Tensor::random(c.types[2], c.n_expert, d, ff, c.biases, &mut rng);
            let x = rng.floats(t * d);
            let r = Routing {
                n_expert: c.n_expert,
                n_used: kk,
                gating: Gating::Softmax,
                normalize: true,
                scale: 1.0,
                groups: None,
            };
            let (ids, weights) = route(&r, &rng.floats(t * c.n_expert), None);
            let want = engine_experts(c, [&gate, &up, &down], &x, &ids, &weights);
            // The GPU's chain, slot by slot, with exact dot products.
            let ideal = |w: &Tensor, e: usize, x: &[f32]| {
                let mut y = super::super::ideal_gpu_matmul(w.ty, w.expert(e), w.rows, w.cols, x);
                if let Some(b) = &w.bias {
                    y.iter_mut().zip(&b[e * w.rows..]).for_each(|(y, b)| *y += b);
                }
                y
            };
            let mut ys = Vec::new();
            for (i, &e) in ids.iter().enumerate() {
                let xt = &x[(i / kk) * d..(i / kk + 1) * d];
                let mut g = ideal(&gate, e, xt);
                act(c.act, &mut g, &ideal(&up, e, xt));
                ys.extend(ideal(&down, e, &g));
            }
            let got = combine(&ids, &weights, &ys, t, kk, d);
            let e = nse(&got, &want);
            println!("{}: ideal kernels vs engine nse {e:.2e}", c.name);
            assert!(e < EXPERTS_LIMIT / 10.0, "{}: {e:.2e}", c.name);
        }
    }

    /// The combine adds in expert order whatever the slot order.
    #[test]
    fn combine_adds_in_expert_order() {
        let y = [1.0f32, 1e8, -1e8, 3.0];
        // Slots (expert 3, w 1), (expert 0, w 1), (expert 1, w 1), (expert 2, w 1) of one
        // token, d = 1: expert order adds 1e8 − 1e8 + 3 + 1 = 4, slot order 1 + 1e8 − 1e8 + 3 = 3.
        let out = combine(&[3, 0, 1, 2], &[1.0; 4], &y, 1, 4, 1);
        assert_eq!(out, vec![4.0]);
    }
}
